# The commands of the README. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

.PHONY: demo demo-stop test lint crds deploy image

## Serves examples/standalone/ on this machine and proves it with an initiator (as root).
demo:
	tools/demo

## Stops what `make demo` serves.
demo-stop:
	tools/demo-stop

## Everything CI checks: formatting, lints, the dependency graph, the CRDs, and every test
## (unit, CLI, and against a real kube-apiserver built from pinned sources), with each
## benchmark once at a small size (fio and vegeta built by tools/build-bench-tools).
test: lint
	@if cargo tree --locked -e normal -i k8s-openapi --depth 0 -d 2>/dev/null | grep -q k8s-openapi; then \
	  echo "two versions of k8s-openapi in the dependency graph: cargo tree -d -i k8s-openapi"; exit 1; fi
	control_plane=$$(tools/build-control-plane) && bench_tools=$$(tools/build-bench-tools) && \
	  DISCUS_CONTROL_PLANE="$$control_plane" DISCUS_BENCH_TOOLS="$$bench_tools" cargo test --locked

lint:
	cargo fmt --all --check
	cargo clippy --locked --all-targets -- -D warnings

## Regenerates crds/ from the Rust types, the chart's copy of them, and deploy/ (which holds them).
crds:
	cargo run --quiet --locked -- crds > crds/discus.yaml
	cp crds/discus.yaml charts/discus/files/crds.yaml
	tools/render-deploy

## Renders deploy/ from the Helm chart (charts/discus), with helm built from tools/k8s.
deploy:
	tools/render-deploy

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
IMAGE ?= discus:$(VERSION)
CARGO_TARGET_DIR ?= target

## Builds the container image $(IMAGE) from the Dockerfile around a release build of discus made
## here (its `prebuilt` path, with BuildKit). The binary must run on Debian 12, the image's base:
## build on Debian 12, or use `docker build -t discus .`, which compiles discus inside.
image:
	cargo build --release --locked --bin discus
	ctx=$$(mktemp -d) && trap 'rm -rf "$$ctx"' EXIT && \
	  cp "$(CARGO_TARGET_DIR)/release/discus" "$$ctx/" && \
	  DOCKER_BUILDKIT=1 docker build --file Dockerfile --build-arg DISCUS_BINARY=prebuilt \
	    --build-arg VERSION=$(VERSION) --build-arg REVISION="$$(git rev-parse HEAD)" \
	    --tag $(IMAGE) "$$ctx"
	docker run --rm $(IMAGE) --version
