// argo-health: Argo CD's Lua interpreter running discus's health checks in tests.
// Never imported; see tools/build-control-plane.
module discus.dev/tools/lua

go 1.26.0

require github.com/yuin/gopher-lua v1.1.1
