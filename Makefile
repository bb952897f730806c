# pqcnet — the two commands a new user needs are `make demo` and `make test`.
# Both set themselves up (venv + install); `make test` also installs and starts
# the real services (Redis, Kafka, go-waku) through scripts/services.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest proto services-up services-down clean bench \
	deploy-tools images

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pqcnet demo

test: $(STAMP)
	scripts/run-tests

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest -q

proto: $(STAMP)
	$(PY) tools/protogen.py

services-up:
	scripts/services start

services-down:
	scripts/services stop

# Deployment tools (dockerd, docker-compose, helm, kubeconform, promtool, base image).
deploy-tools:
	scripts/deploy-tools install
	scripts/deploy-tools start

# The role images pqcnet-sentry / pqcnet-relayer (docker/Dockerfile) on our dockerd.
images: $(STAMP) deploy-tools
	$(PY) tools/images.py

bench: $(STAMP)
	$(VENV)/bin/pqcnet bench --help

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
