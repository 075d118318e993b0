#!/usr/bin/env bash
# Build (and vet) the Go example offline with Debian's Go toolchain and packages, in GOPATH mode:
#   apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev
# Debian installs the sources under /usr/share/gocode/src; this module is linked into a private GOPATH beside them.
# Usage: clients/go/build.sh [OUT]   (default OUT: clients/go/bin/example)
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
go build -o "$out" ./example/
