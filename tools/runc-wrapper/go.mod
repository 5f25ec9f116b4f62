// runc-wrapper: runc for dockerd on machines whose bounding set lacks capabilities (tests only).
// Never imported; see tools/build-control-plane.
module discus.dev/tools/runc-wrapper

go 1.26.0
