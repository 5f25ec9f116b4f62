//go:build tools

// Package tools pins the binaries of the tests' clusters, built together in one `go build` so
// that the packages they share compile once (tools/build-control-plane): the control plane
// (kube-apiserver, kube-controller-manager, kube-scheduler), a node's kubelet, kubectl, and helm,
// whose v3.21 line requires the same Kubernetes libraries (v0.36) as the rest. It is never
// compiled into discus.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
