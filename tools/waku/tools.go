//go:build tools

// Package tools pins the go-waku command in this module's dependency graph so
// that `go build github.com/waku-org/go-waku/cmd/waku` resolves from go.mod/go.sum.
package tools

import _ "github.com/waku-org/go-waku/cmd/waku"
