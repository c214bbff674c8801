#!/usr/bin/env bash
# Builds the real control plane from Go modules, once per machine, into a cache outside the checkout:
# kube-apiserver, kube-controller-manager, kube-scheduler, etcd and KubeRay's ray-operator (+ its CRDs).
# Prints the cache's bin directory. Nothing built here is committed.
set -euo pipefail
source "$(dirname "$0")/versions.env"

CACHE="${RAYPRISM_CONTROLPLANE_CACHE:-$HOME/.cache/rayprism/controlplane}/$CONTROLPLANE_VERSIONS"
BIN="$CACHE/bin"
mkdir -p "$BIN" "$CACHE/crds"
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
LDFLAGS="-s -w"

log() { echo "build.sh: $*" >&2; }

build_kubernetes() {
  local dir="$CACHE/src/kubernetes"
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ] && return
  log "kubernetes v$KUBERNETES_VERSION (staging v$KUBERNETES_STAGING_VERSION)"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init local/kubernetes-build >/dev/null 2>&1
  # k8s.io/kubernetes requires its staging repositories at v0.0.0 and replaces them with local paths;
  # Go ignores a dependency's replaces, so this module replaces each one with its published release.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  for m in $(sed -n 's|^\t\(k8s.io/[a-z0-9-]*\) => ./staging/.*|\1|p' "$gomod"); do
    go mod edit -replace="$m=$m@v$KUBERNETES_STAGING_VERSION"
  done
  grep '^godebug' "$gomod" >> go.mod || true
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
  go get "k8s.io/kubernetes@v$KUBERNETES_VERSION" >/dev/null
  local vpkg=k8s.io/component-base/version
  local x="-X $vpkg.gitVersion=v$KUBERNETES_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=${KUBERNETES_VERSION#1.}"
  x="${x%.*}"
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    [ -x "$BIN/$c" ] && continue
    log "  go build $c"
    go build -trimpath -ldflags "$LDFLAGS $x" -o "$BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$BIN/$c.tmp" "$BIN/$c"
  done
}

build_etcd() {
  [ -x "$BIN/etcd" ] && return
  log "etcd v$ETCD_VERSION"
  local dir="$CACHE/src/etcd"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init local/etcd-build >/dev/null 2>&1
  # server/go.mod replaces its sibling modules with local paths; requiring the published server module
  # from here resolves them to their releases. Its root package is etcd's main.
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null
  go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_kuberay() {
  [ -x "$BIN/ray-operator" ] && [ -n "$(ls "$CACHE/crds" 2>/dev/null)" ] && return
  log "kuberay ray-operator v$KUBERAY_VERSION"
  local dir="$CACHE/src/kuberay"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init local/kuberay-build >/dev/null 2>&1
  go get "github.com/ray-project/kuberay/ray-operator@v$KUBERAY_VERSION" >/dev/null
  go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/ray-operator.tmp" github.com/ray-project/kuberay/ray-operator
  mv "$BIN/ray-operator.tmp" "$BIN/ray-operator"
  local src
  src=$(go list -m -f '{{.Dir}}' "github.com/ray-project/kuberay/ray-operator")
  cp "$src"/config/crd/bases/*.yaml "$CACHE/crds/"
  chmod u+w "$CACHE"/crds/*.yaml
}

what="${1:-all}"
case "$what" in
  all) build_etcd; build_kuberay; build_kubernetes ;;
  etcd) build_etcd ;; kuberay) build_kuberay ;; kubernetes) build_kubernetes ;;
  *) echo "usage: build.sh [all|etcd|kuberay|kubernetes]" >&2; exit 2 ;;
esac
echo "$BIN"
