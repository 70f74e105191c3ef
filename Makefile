# vllm-guard: `make run` starts a real vLLM (CPU) and the gateway in front of it;
# `make test` installs what the tests need and runs them all.
PYTHON ?= python3
VENV := .venv
ENGINE_VENV := .venv-engine
MODEL_DIR := models/tiny
CONFIG ?= config.yaml

.PHONY: run test unit lint typecheck pytest venv engine model system bench clean

$(VENV)/.installed: pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests use (redis-server, wrk, nginx): installed when missing.
system:
	bash scripts/install-system.sh

engine:
	ENGINE_VENV=$(ENGINE_VENV) PYTHON=$(PYTHON) bash scripts/install-engine.sh

model: engine
	$(ENGINE_VENV)/bin/python scripts/make_tiny_model.py $(MODEL_DIR)

run: venv model
	@echo "vllm-guard on http://127.0.0.1:8080 in front of vLLM (first engine start: about a minute)."
	@echo "Then:  curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "         -d '{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"
	$(VENV)/bin/vllm-guard run --config $(CONFIG)

lint: venv
	$(VENV)/bin/ruff format --check gateway engine tests scripts bench
	$(VENV)/bin/ruff check gateway engine tests scripts bench

typecheck: venv
	$(VENV)/bin/mypy

# Every test, the real engine's included, with branch coverage and its floor (pyproject.toml).
pytest: venv model system
	$(VENV)/bin/pytest --cov --cov-report=term

test: lint typecheck pytest

# The fast loop: the pure tables of tests/unit (seconds; no engine, no sockets). Reads the tiny
# model's tokenizer files (models/tiny) but never builds anything.
unit: venv
	$(VENV)/bin/pytest -q tests/unit

# Figures, not assertions: CPU per admitted request against the emulator (about a minute).
bench: venv model
	$(VENV)/bin/python bench/admission_cost.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) $(MODEL_DIR) .pytest_cache .mypy_cache .ruff_cache
