# The commands of the README. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: demo demo-stop test lint crds

## Serves examples/standalone/ on this machine and proves it with an initiator (as root).
demo:
	tools/demo

## Stops what `make demo` serves.
demo-stop:
	tools/demo-stop

## Everything CI checks: formatting, lints, the dependency graph, the CRDs, and every test
## (unit, CLI, and against a real kube-apiserver built from pinned sources).
test: lint
	@if cargo tree --locked -e normal -i k8s-openapi --depth 0 -d 2>/dev/null | grep -q k8s-openapi; then \
	  echo "two versions of k8s-openapi in the dependency graph: cargo tree -d -i k8s-openapi"; exit 1; fi
	DISCUS_CONTROL_PLANE="$$(tools/build-control-plane)" cargo test --locked

lint:
	cargo fmt --all --check
	cargo clippy --locked --all-targets -- -D warnings

## Regenerates crds/ from the Rust types.
crds:
	cargo run --quiet --locked -- crds > crds/discus.yaml
