//go:build tools

// Package tools pins the control-plane binaries the tests build; it is never compiled into discus.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
