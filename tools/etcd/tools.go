//go:build tools

// Package tools pins etcd for the test control plane; it is never compiled into discus.
package tools

import _ "go.etcd.io/etcd/server/v3"
