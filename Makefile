# Two commands set everything up on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-all lint compat bench-convert bench-coldstart clean

# PyPI serves Linux torch wheels built for CUDA (several GB of NVIDIA libraries); PyTorch's own CPU index serves the
# CPU build. `make setup TORCH_INDEX=` installs from your pip configuration alone (e.g. where it already serves the
# CPU wheel), `TORCH_INDEX=https://download.pytorch.org/whl/cu128` a CUDA build.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
# The Azure Storage emulator the az:// tests run (an npm package: installed only where npm is).
AZURITE_VERSION ?= 3.37.0

setup:
	@echo "make setup [1/3]: torch $(TORCH_VERSION) from $(or $(TORCH_INDEX),your pip configuration)"
	@$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		&& echo "  already installed" \
		|| $(PIP) install --disable-pip-version-check --progress-bar on --no-deps --retries 1 -c constraints.txt \
			$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION)
	@echo "make setup [2/3]: reshard (editable), torch's dependencies and the test tools: transformers, moto, gcsfs, ruff, mypy, ..."
	@$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@echo "make setup [3/3]: Azurite $(AZURITE_VERSION) (npm, into .node/) for the az:// tests"
	@if [ -x .node/node_modules/.bin/azurite-blob ]; then echo "  already installed"; \
	elif command -v npm >/dev/null; then npm install --prefix .node --no-audit --no-fund --loglevel error \
		azurite@$(AZURITE_VERSION) || echo "  Azurite did not install: the az:// tests will skip"; \
	else echo "  no npm here: the az:// tests will skip"; fi
	@echo "make setup: done"

demo: setup
	$(PYTHON) examples/demo.py

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q -p no:cacheprovider --doctest-modules manifests reshard loaders --ignore=reshard/__main__.py
	$(PYTHON) -m pytest -q

# make test, then the model-type matrix (tests/test_matrix.py: every supported model type at tp 2 and 4, about
# 20 minutes on 2 cores); it rewrites tests/fixtures/matrix_results.json, the source of docs/architectures.md's
# "tested" column, and regenerates that file from it.
test-all: test
	RESHARD_MATRIX=1 $(PYTHON) -m pytest -q tests/test_matrix.py; status=$$?; $(PYTHON) scripts/architectures_table.py; exit $$status

# The runtime parity tests against each supported transformers release, each in its own venv under /tmp.
compat:
	PYTHON=$(PYTHON) scripts/compat.sh $(COMPAT_VERSIONS)

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check . && $(PYTHON) -m mypy

bench-convert: setup
	$(PYTHON) benchmarks/convert.py

bench-coldstart: setup
	$(PYTHON) benchmarks/coldstart.py

clean:
	rm -rf demo-out bench-out .pytest_cache
