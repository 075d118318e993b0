#!/usr/bin/env bash
# Build (and vet) the Go example offline with Debian's Go toolchain and packages, in GOPATH mode:
#   apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev
# Debian installs the sources under /usr/share/gocode/src; this module is linked into a private GOPATH beside them.
# Usage: clients/go/build.sh [OUT]   (default OUT: clients/go/bin/example; OUT.test is the example's test binary,
# which needs a live server: EVALSVC_TEST_TARGET=HOST:PORT EVALSVC_API_KEY=evk_... OUT.test -test.v)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/bin/example}"
gopath="$(mktemp -d)"
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/evalsvc/clients"
ln -s "$here" "$gopath/src/evalsvc/clients/go"
export GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOPROXY=off
cd "$gopath/src/evalsvc/clients/go"
go vet ./gen/... ./example/
# Every generated package loads in one program beside grpc's status package (which registers
# google/rpc/status.proto from genproto) and genproto's errdetails: a file registered twice panics at init.
loads="$gopath/src/evalsvc/loads"
mkdir -p "$loads"
{
  printf 'package main\n\nimport (\n\t_ "google.golang.org/genproto/googleapis/rpc/errdetails"\n\t_ "google.golang.org/grpc/status"\n'
  find gen -name '*.go' -printf '%h\n' | sort -u | sed 's|.*|\t_ "evalsvc/clients/go/&"|'
  printf ')\n\nfunc main() {}\n'
} >"$loads/main.go"
go run "$loads/main.go"
go build -o "$out" ./example/
go test -c -o "$out.test" ./example/
