# `make test` is the project's test command (README, .ci/run). It builds its own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTOS := $(shell find proto -name '*.proto')
DEPLOY_VENV ?= .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed-stamp
DEPLOY_PATH := PATH=$(abspath $(DEPLOY_VENV))/bin:$$PATH

# The host's Debian packages come from scripts/setup-host.sh (root: through sudo when not root).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: test lint typecheck unit proto bench clean molecule lab lab-down lab-attack lab-partition lab-verify ansible-lint host-test host-lab

# Two lanes side by side (scripts/test-lanes.sh): the host's checks and unit tests, and the deployment's
# (ansible-lint, Molecule). Every stage runs even when one fails; a summary at the end; the run fails if any
# stage did. The venvs and generated code are made first, once, for both.
HOST_STAGES := lint typecheck unit
DEPLOY_STAGES := ansible-lint molecule
test: host-test
	@$(MAKE) --no-print-directory proto $(DEPLOY_STAMP)
	@MAKE="$(MAKE)" scripts/test-lanes.sh "$(HOST_STAGES)" "$(DEPLOY_STAGES)"

host-test:
	$(SUDO) scripts/setup-host.sh --for test

host-lab:
	$(SUDO) scripts/setup-host.sh --for lab

$(STAMP): pyproject.toml hatch_build.py $(PROTOS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Controller tools (ansible, molecule, testinfra) for the deployment, pinned in requirements-deploy.txt.
$(DEPLOY_STAMP): requirements-deploy.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q -r requirements-deploy.txt
	touch $@

# Molecule scenarios on real systemd in systemd-nspawn machines (root; see scripts/nspawn/).
molecule: $(DEPLOY_STAMP) proto
	$(DEPLOY_PATH) molecule test -s default
	$(DEPLOY_PATH) molecule test -s fleet
	$(DEPLOY_PATH) molecule test -s cluster

# The lab fleet (hub, web1, db1 on br-amx-lab) with site.yml; `make lab-down` removes it. CLUSTER=1: a hub
# cluster (hub2, hub3 join hub as NATS + hub nodes; README, The hub cluster).
CLUSTER ?= 0
lab: host-lab $(DEPLOY_STAMP) proto
	$(DEPLOY_PATH) CLUSTER=$(CLUSTER) scripts/lab.sh up

lab-down:
	scripts/lab.sh down

# A short attack on the running lab; each step's alert must reach the hub within 10 s (README, Lab).
lab-attack:
	scripts/lab-attack.sh

# Web1 cut off from the hub for PARTITION_S (default 120) s, then healed: the agents notice within 30 s,
# reconnect within 40 s, and every event written meanwhile reaches the hub exactly once (README, Lab).
lab-partition:
	scripts/lab-partition.sh

# The running lab is quiet: 20 SSH logins to every host raise no alert (issue 12); then the attack and
# the partition.
lab-verify:
	scripts/lab.sh quiet
	scripts/lab-attack.sh
	scripts/lab-partition.sh

proto: $(STAMP)
	$(BIN)/python hatch_build.py

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks) molecule hatch_build.py
	$(BIN)/ruff format --check src tests $(wildcard benchmarks) molecule hatch_build.py

# Roles, playbooks and inventories at ansible-lint's production profile (config: .ansible-lint).
ansible-lint: $(DEPLOY_STAMP)
	$(DEPLOY_PATH) ansible-lint --profile production

typecheck: proto
	$(BIN)/mypy

unit: proto
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache src/amoskys/v1/*_pb2*
