# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint lock kafka-jars connect-jars clean

# Every package at the version requirements/dev.txt pins, checked against its hashes; the
# project itself then, with the pinned setuptools (no build isolation: nothing unpinned).
$(STAMP): pyproject.toml requirements/dev.txt deploy/install-system.sh
	bash deploy/install-system.sh $(if $(filter test,$(MAKECMDGOALS)),--postgres,)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# After a change of pyproject.toml's dependencies: the locks again, each version the newest
# that pyproject.toml allows unless it is already pinned (`--upgrade` moves them all).
# requirements/runtime.txt builds the image (deploy/docker/Dockerfile).
# dev.txt is held to runtime.txt's pins: what is tested is what the image ships.
LOCK := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-find-links --no-emit-index-url --all-build-deps
lock: $(STAMP)
	$(LOCK) $(ARGS) --output-file requirements/runtime.txt pyproject.toml
	$(LOCK) $(ARGS) --extra dev --constraint requirements/runtime.txt --output-file requirements/dev.txt pyproject.toml

kafka-jars: $(STAMP)
	$(BIN)/python -c "from transport.local import ensure_jars; print('Kafka jars in', ensure_jars())"

# Kafka Connect and the Debezium PostgreSQL connector: the debezium adapter's integration test.
connect-jars: $(STAMP)
	$(BIN)/python -c "from transport.connect import ensure_connect_jars as e; print('Connect jars in', e())"

demo: kafka-jars
	$(BIN)/portal-sync demo

# Unit and property tests (CPU-bound, no servers) in parallel processes; the integration
# tests, which start and kill real servers, in parallel processes, each with its own servers.
# Bytecode first: where PYTHONDONTWRITEBYTECODE is set (this project's machines set it),
# every child process the tests start (a CLI command, a worker) compiled our modules
# again: `worker --until-caught-up` on an empty topic took 2.8-3.2 s, 2.4-2.6 s without.
PACKAGES := portal_sync producers consumers schemas store transport observability
test: kafka-jars connect-jars
	bash deploy/install-system.sh --postgres
	$(BIN)/python -m compileall -q -j 0 $(PACKAGES) tests bench >/dev/null
	# The PostgreSQL, Prometheus, Helm and systemd units' tests (each process starts its own
	# PostgreSQL and Prometheus) beside the unit tests: they wait on their servers' starts
	# much of their time. Their output comes after the unit tests'.
	@log=$$(mktemp); \
	$(BIN)/pytest -n 2 tests/integration/postgres tests/integration/prometheus \
		tests/integration/helm tests/integration/deploy >"$$log" 2>&1 & servers=$$!; \
	$(BIN)/pytest -n 2 tests/unit; \
	unit=$$?; wait $$servers; code=$$?; cat "$$log"; rm -f "$$log"; \
	test $$unit -eq 0 && test $$code -eq 0
	# A broker for each of three processes; a file's tests stay in one process, one at a
	# time (fault tests time what they kill), the slowest files first (the folder's
	# conftest.py). Much of their time is waiting on a restart, a rebalance or a stall's
	# threshold: two processes left the cores a third idle (`time`); three fill them. The
	# benches' short runs (test_benches.py) bring their own broker and PostgreSQL.
	$(BIN)/pytest -n 3 --dist loadfile --no-loadscope-reorder tests/integration/kafka

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
