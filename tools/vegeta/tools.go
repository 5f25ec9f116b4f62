//go:build tools

// Package tools pins vegeta's version in go.mod; tools/build-bench-tools builds its command.
package tools

import _ "github.com/tsenart/vegeta/v12"
