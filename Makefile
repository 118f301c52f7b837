# fusion-celery developer entry points.
#
#   make venv     create .venv and install the package (editable, dev+flower extras); .venv-faust with the faust extra
#   make up       start Kafka (KRaft) + Redis + ZooKeeper locally (stack/stack.sh); FUSION_KAFKA_NODES=3 make up:
#                 a Kafka cluster of three nodes (make status/down, stack.sh stop|start kafka-2 work per node);
#                 FUSION_BROKER=rabbitmq make up: RabbitMQ too, as the Celery broker (Redis stays the backend)
#   make down     stop them;  make status  show them
#   make test     run pytest with the stack up (starts/stops it unless already up)
#   make test-unit  the tests that need no service (not integration/soak/faults), with no stack started
#   make test-cluster  the tests that need a Kafka cluster (pytest -m cluster), on FUSION_KAFKA_NODES=3
#   make test-rabbitmq  RabbitMQ as the Celery broker (FUSION_BROKER=rabbitmq): the tests that touch the broker
#                 (pytest -m broker) again, and those that need RabbitMQ (-m rabbitmq: its faults, restore)
#   make bench    the benchmark (python -m bench), its last section onedep latency and throughput at 100 in
#                 flight with each Celery broker, Redis and RabbitMQ (RabbitMQ is started for it)
#   make soak     the long reliability suite (pytest -m soak: 30-minute soak, faults with 300 waits)
#   make demo     venv + stack, then a worker with the math example, Flower and one pipeline call (Ctrl-C stops)
#   make docs     build the docs (mkdocs --strict) into site/; mermaid comes from the npm registry (npm pack, cached in .cache/)
#   make docs-check  make docs, then every page of site/ in headless Chromium (tools/docs/check_site.py): loads,
#                 no JS error, Mermaid diagrams rendered as SVG, images load, links and anchors exist
#   make clean    stop the stack and delete its state (.stack/)
#
# Variables: PYTEST_ARGS (default -ra), e.g. make test PYTEST_ARGS="-x -k smoke"

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON3     ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
# faust-streaming (the Faust examples) in a venv of its own: it pins click below what the dev tools need
VENV_FAUST  := .venv-faust
STACK       := bash stack/stack.sh
WITH_STACK  := bash stack/with-stack.sh
PYTEST_ARGS ?= -ra --durations=25

.PHONY: help venv up down status test test-unit test-cluster test-rabbitmq demo bench bench-cluster soak docs docs-check clean

help:
	@sed -n '3,23p' Makefile | sed 's/^# \{0,1\}//'

venv: $(VENV)/.installed $(VENV_FAUST)/.installed

$(PY):
	$(PYTHON3) -m venv $(VENV)

# reinstall only when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev,flower]"
	@touch $@

$(VENV_FAUST)/.installed: pyproject.toml
	$(PYTHON3) -m venv $(VENV_FAUST)
	$(VENV_FAUST)/bin/python -m pip install -q "$$(sed -n 's/^faust = \["\(.*\)"\]$$/\1/p' pyproject.toml)"
	@touch $@

up:
	$(STACK) up

down:
	$(STACK) down

status:
	$(STACK) status

test: venv
	$(WITH_STACK) $(PY) -m pytest $(PYTEST_ARGS)

# No stack: a test that needs a service carries the integration marker (tests/conftest.py refuses one that
# asks for a service fixture without it). Two processes (pytest-xdist), each test file in one of them, so that
# a module's in-process worker serves all its tests.
test-unit: venv
	$(PY) -m pytest -m "not integration and not soak and not faults and not browser" -n 2 --dist loadfile $(PYTEST_ARGS)

# A Kafka cluster of three nodes (stack.sh with FUSION_KAFKA_NODES=3). A single-node stack that is up is
# stopped first (each topology keeps its own data), and what this target started is stopped afterwards.
test-cluster: venv
	@if [[ "$$($(STACK) services | grep -c '^kafka')" != 3 ]] && $(STACK) status kafka >/dev/null 2>&1; then \
	  echo "make test-cluster: stopping the single-node stack first"; $(STACK) down; fi
	FUSION_KAFKA_NODES=3 $(WITH_STACK) $(PY) -m pytest -m cluster -p no:cacheprovider $(PYTEST_ARGS)

# RabbitMQ as the Celery broker, Redis the result backend: the tests marked broker again, and those marked
# rabbitmq (FUSION_TEST_BROKER has each of them fail unless the broker is RabbitMQ). A stack that is up keeps
# its Kafka, Redis and ZooKeeper; RabbitMQ is started if needed, and what this target started is stopped.
test-rabbitmq: venv
	FUSION_BROKER=rabbitmq FUSION_TEST_BROKER=rabbitmq $(WITH_STACK) $(PY) -m pytest \
	  -m "(broker or rabbitmq) and not soak and not cluster" -p no:cacheprovider $(PYTEST_ARGS)

demo: venv up
	$(WITH_STACK) $(PY) -m examples.demo

# RabbitMQ is started too, for the brokers section (the other sections use Redis as their broker).
bench: venv
	FUSION_BROKER=rabbitmq $(WITH_STACK) $(PY) -m bench --brokers redis,rabbitmq

# One Kafka node and a cluster of three side by side (it starts and stops the stack for each; see bench/cluster.py).
bench-cluster: venv
	$(PY) -m bench.cluster

soak: venv
	$(WITH_STACK) $(PY) -m pytest -m soak $(PYTEST_ARGS)

# The site serves Mermaid itself (no CDN): tools/docs/hooks.py fetches the pinned mermaid package with npm
# (node and npm are installed on this project's machines) into .cache/docs/ on the first build.
docs: venv
	$(VENV)/bin/mkdocs build --strict

# Debian's chromium is installed when missing, as .ci/run installs its apt packages; Playwright drives it
# (its own browser downloads are never used). Then the checker's own tests (pytest -m browser).
docs-check: docs
	@[[ -x /usr/bin/chromium ]] || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	$(PY) tools/docs/check_site.py site
	$(PY) -m pytest -m browser -p no:cacheprovider $(PYTEST_ARGS) tests/test_check_site.py

clean:
	-$(STACK) down
	rm -rf .stack
