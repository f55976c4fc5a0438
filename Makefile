# Two entry points for a fresh machine: `make demo` (set up + run the main job) and `make test`.
PY ?= python3
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: a bare torch requirement would pull several GB of CUDA wheels. TORCH_INDEX: an index
	# serving the CPU build, where pip's own serves the CUDA one (e.g. https://download.pytorch.org/whl/cpu).
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/hrnn demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) out
