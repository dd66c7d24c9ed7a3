# cellserve — the two commands: `make serve` (run the server on the shipped model) and `make test`.
# Both create .venv if it is missing and install what they need into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTOS := $(shell find proto -name '*.proto' | sort)
# Extra flags for `make serve`, e.g. make serve ARGS="--port 50052 --device cuda"
ARGS   ?=

.PHONY: serve test lint proto proto-check pytest install-serve install-dev images image-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.serve: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[serve]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.serve

install-serve: $(VENV)/.serve
install-dev: $(VENV)/.dev

## serve: install the serving extra and serve the shipped default model on :50051 (metrics :9090)
serve: install-serve
	$(VENV)/bin/cellserve serve $(ARGS)

## test: lint, check generated code for drift, run the test suite
test: install-dev lint proto-check pytest

lint: install-dev
	$(VENV)/bin/ruff check .

## proto: regenerate the committed Python stubs from proto/
proto: install-dev
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto --pyi_out=proto $(PROTOS)

## proto-check: fail if the committed stubs differ from a fresh protoc run
proto-check: install-dev
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -I proto --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp $(PROTOS) && \
	( cd $$tmp && find . -name '*_pb2*' | sort ) > $$tmp.list && \
	status=0; while read -r f; do cmp -s "$$tmp/$$f" "proto/$$f" || { echo "generated code drift: proto/$$f (run 'make proto')"; status=1; }; done < $$tmp.list; \
	rm -rf $$tmp $$tmp.list; exit $$status
	@echo "proto stubs: no drift"

pytest: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

## images: build cellserve:<version>-cpu and -gpu with podman on a debootstrapped Debian base (Linux, root)
images:
	deploy/image/build.sh

## image-check: build the images (cached) and run the checks against them (part of `make test`)
image-check: install-dev
	$(PY) -m pytest tests/deploy/test_image.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
