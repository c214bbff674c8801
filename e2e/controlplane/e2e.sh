#!/usr/bin/env bash
# The e2e suite (e2e/test_e2e.py) on this machine's real control plane: brings the cluster up when none
# runs (and down again at the end, unless E2E_KEEP_CLUSTER=1), installs the rayprism chart with Helm as
# users do (the operator runs as the chart's Deployment, with its ServiceAccount's RBAC), and runs the
# suite in a namespace that enforces Pod Security `restricted`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
log() { printf '\n=== %s\n' "$*"; }

started=0
if ! $PY -c 'import sys; from e2e.controlplane.cluster import running; sys.exit(0 if running("kube-apiserver") else 1)'; then
  started=1
fi
finish() {
  status=$?
  if [ "$status" -ne 0 ] && [ -f .cluster/kubeconfig ]; then
    log "diagnostics"
    "$KUBECTL" get nodes,infd,rayclusters,pods,svc,endpointslices -A -o wide || true
    "$KUBECTL" get events -A --sort-by=.lastTimestamp | tail -40 || true
    for f in .cluster/kubelet/pods/*/*.log .cluster/kubelet/logs/*/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -40 "$f"; }; done
    tail -30 .cluster/logs/kubelet.log || true
  fi
  if [ "$started" = 1 ] && [ "${E2E_KEEP_CLUSTER:-0}" != 1 ]; then
    log "cluster down"
    $PY -m e2e.controlplane.cluster down || true
  fi
  exit "$status"
}
trap finish EXIT

log "cluster"
$PY -m e2e.controlplane.cluster up
eval "$($PY -m e2e.controlplane.cluster env)"
eval "$($PY tests/chart/tools.py --exports)"

log "models: two revisions of SmolLM2 (v2's final norm negated, so greedy answers tell them apart)"
export RAYPRISM_E2E_MODEL_URI="file://$PWD/.cluster/models/{revision}"
$PY -m e2e.models "$PWD/.cluster/models"

log "rayprism chart"
export RAYPRISM_E2E_NAMESPACE=rayprism-e2e
for ns in rayprism-system "$RAYPRISM_E2E_NAMESPACE"; do
  "$KUBECTL" create namespace "$ns" --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
  "$KUBECTL" label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null
done
"$KUBECTL" apply --server-side --force-conflicts -f charts/rayprism/crds/ >/dev/null
"$HELM" upgrade --install rayprism charts/rayprism --namespace rayprism-system \
  --set logLevel=debug --wait --timeout 5m

log "suite"
# E2E_TESTS: other test paths or node ids than the whole suite (e.g. e2e/test_security.py).
# shellcheck disable=SC2086
RAYPRISM_E2E=1 RAYPRISM_E2E_SMALL=1 $PY -m pytest -v -x -rP -p no:cacheprovider -m e2e ${E2E_TESTS:-e2e/}
