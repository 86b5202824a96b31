#!/usr/bin/env bash
# Build tools/vcsim (govmomi's vSphere API simulator) offline from Debian's packages golang-go and
# golang-github-vmware-govmomi-dev: GOPATH mode, no module proxy. Usage: build.sh [OUTPUT] (default
# tools/vcsim/vcsim). Exit 3 when Go or the govmomi sources are absent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/vcsim}"
if ! command -v go >/dev/null; then
  echo "vcsim: go is not installed (apt-get install golang-go golang-github-vmware-govmomi-dev)" >&2
  exit 3
fi
if [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
  echo "vcsim: govmomi's simulator sources are not installed (apt-get install golang-github-vmware-govmomi-dev)" >&2
  exit 3
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$here"
GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOCACHE="${GOCACHE:-$work/cache}" GOFLAGS= \
  go build -o "$out.tmp" . && mv "$out.tmp" "$out"
