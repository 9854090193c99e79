# The two commands of the quick start are `make run` and `make test`; both provision first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: provision run test lint protos migrate bench clean-data

provision:
	@bash scripts/provision.sh

run: provision
	@DEMO=$(DEMO) $(PY) -m tally.devstack run

test: provision
	@$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: provision
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	cd protos && ../$(VENV)/bin/buf lint

protos: provision
	$(PY) scripts/gen_protos.py
	$(PY) -m gateway --render --compose > gateway/envoy.compose.yaml

migrate: provision
	$(PY) -m tally.runtime.migrate

bench: provision
	$(PY) -m bench

clean-data:
	rm -rf .data
