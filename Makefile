# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint kafka-jars clean

$(STAMP): pyproject.toml deploy/install-system.sh
	bash deploy/install-system.sh $(if $(filter test,$(MAKECMDGOALS)),--postgres,)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

kafka-jars: $(STAMP)
	$(BIN)/python -c "from transport.local import ensure_jars; print('Kafka jars in', ensure_jars())"

demo: kafka-jars
	$(BIN)/portal-sync demo

test: kafka-jars
	bash deploy/install-system.sh --postgres
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
