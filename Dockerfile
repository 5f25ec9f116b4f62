# The discus image: `discus agent` (the Helm chart's DaemonSet) and `discus serve`, with what
# they run — qemu-img (qemu-utils) to inspect and convert images, tgtd and tgtadm (tgt) where the
# kernel has no LIO, modprobe (kmod) to load the target modules, CA certificates for https image
# sources — on Debian 12, and nothing else.
#
#   docker build -t discus .
#
# builds discus from this source tree (Rust, in the `compiled` stage). With a discus binary built
# already (for Debian 12's glibc or static), skip the Rust build — this is what `make image` and
# the tests do, with BuildKit (Docker 23 or newer, or DOCKER_BUILDKIT=1):
#
#   mkdir ctx && cp target/release/discus ctx/
#   docker build -f Dockerfile --build-arg DISCUS_BINARY=prebuilt -t discus ctx
#
# Why not distroless: the agent runs programs, not only itself — tgtd and tgtadm, qemu-img,
# modprobe — and those come as Debian packages with their shared libraries (glib, gnutls, aio,
# rdma, kmod). Copying them into a distroless base by hand would lose the package database that
# security scanners and updates rely on; debian:bookworm-slim keeps it, at some 100 MB more.
#
# discus is PID 1: it handles SIGTERM (the agent finishes its pass and exits, leaving targets
# serving) and reaps its children (tgtd, qemu-img, tgtadm), which never leave orphans behind, so
# the image needs no init.

# The bases, by the names Docker Hub gives them; pin them by digest for reproducible builds.
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-slim-bookworm
# compiled: build discus here. prebuilt: take `discus` from the build context.
ARG DISCUS_BINARY=compiled

FROM ${RUST_IMAGE} AS compiled
# make: jemalloc, discus's allocator, is built from C sources with it.
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin discus \
 && install -D -m 0755 target/release/discus /in/discus

# With BuildKit only the stage DISCUS_BINARY names is built; the legacy builder builds every stage,
# which is why this one copies the whole context rather than a file the context may not have.
FROM scratch AS prebuilt
COPY . /in/

FROM ${DISCUS_BINARY} AS binary

FROM ${DEBIAN_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/discus-dev/discus
LABEL org.opencontainers.image.title="discus" \
      org.opencontainers.image.description="Serve verified disc images as iSCSI targets from Kubernetes storage nodes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# tgtd needs libgcc_s at run time (glibc loads it for pthread_cancel) without depending on it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates kmod libgcc-s1 qemu-utils tgt \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY --from=binary /in/discus /usr/local/bin/discus
ENTRYPOINT ["/usr/local/bin/discus"]
CMD ["--help"]
