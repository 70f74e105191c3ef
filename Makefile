# vllm-guard: `make run` starts a real vLLM (CPU) and the gateway in front of it;
# `make test` installs what the tests need and runs them all.
PYTHON ?= python3
VENV := .venv
ENGINE_VENV := .venv-engine
MODEL_DIR := models/tiny
CONFIG ?= config.yaml

.PHONY: run test unit lint typecheck pytest venv venv-bench engine model system bench bench-engine profile soak loadtest clean

$(VENV)/.installed: pyproject.toml
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The benchmarks' extra tools (matplotlib for the plot, py-spy for the profile).
$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	touch $@

venv-bench: $(VENV)/.bench-installed

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
	$(VENV)/bin/ruff format --check gateway engine tests scripts bench loadtest
	$(VENV)/bin/ruff check gateway engine tests scripts bench loadtest

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

# Figures, not assertions. Admission CPU per request against the emulator (about a minute),
# then the relay matrix: direct, bare aiohttp relay, nginx, vllm-guard under wrk (a few
# minutes; BENCH=full for every cell, about 25 minutes). Results in bench/results/.
BENCH ?= quick
bench: venv-bench model system
	$(VENV)/bin/python bench/admission_cost.py
	$(VENV)/bin/python bench/relay_matrix.py $(if $(filter full,$(BENCH)),--full)

# vLLM's own `vllm bench serve`, directly and through the gateway, against the real engine.
bench-engine: venv model
	$(VENV)/bin/python bench/engine_serve.py

# Where the gateway's time goes under wrk load (py-spy): bench/results/profile-*.
profile: venv-bench model system
	$(VENV)/bin/python bench/profile_gateway.py

# Ten minutes at 64 users; the gateway's memory at start and end.
soak: venv model
	$(VENV)/bin/python bench/soak.py

# Locust against the emulator behind the gateway (DURATION seconds, USERS users), or against a
# running stack (HOST=http://...), or with locust's web UI (UI=1); POISON=MARKER kills the
# emulator with requests that carry it. Exit 1 on any unexpected status or unanswered request.
DURATION ?= 60
USERS ?= 16
loadtest: venv model
	$(VENV)/bin/python loadtest/run.py --duration $(DURATION) --users $(USERS) \
		$(if $(HOST),--host $(HOST)) $(if $(UI),--ui) $(if $(POISON),--poison $(POISON))

clean:
	rm -rf $(VENV) $(ENGINE_VENV) $(MODEL_DIR) .pytest_cache .mypy_cache .ruff_cache
