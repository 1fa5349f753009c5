"""Ansible roles: argument specs match the defaults; alert rules name metrics the code really exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from amoskys.catalog import AGENT_KINDS

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "tasks" / "main.yml").exists())
RULES = ROOT / "roles" / "amoskys_prometheus" / "files" / "amoskys.rules.yml"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_argument_specs_document_every_default(role: Path) -> None:
    defaults = load(role / "defaults" / "main.yml") or {}
    options = load(role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options), f"{role.name}: defaults and argument_specs differ"
    for name, value in defaults.items():
        spec = options[name]
        assert spec.get("description"), f"{role.name}: {name} has no description"
        if not (isinstance(value, str) and "{{" in value):  # templated defaults are described in words
            assert spec.get("default") == value, f"{role.name}: {name}: {value!r} in defaults, {spec.get('default')!r}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_shape(role: Path) -> None:
    """main.yml is a table of contents: preflight, install, configure, each tagged; before them only facts that
    every role reads whichever tags run (tagged `always`: amoskys_common's agent kinds)."""
    every_run = [s for s in load(role / "tasks" / "main.yml") if s["tags"] == ["always"]]
    steps = load(role / "tasks" / "main.yml")[len(every_run) :]
    assert [s["ansible.builtin.import_tasks"] for s in steps] == ["preflight.yml", "install.yml", "configure.yml"]
    assert all(role.name in s["tags"] for s in steps)
    for step in ("preflight", "install", "configure"):
        assert (role / "tasks" / f"{step}.yml").exists()


def exported_metrics() -> set[str]:
    """Metric names the code declares (first arguments of prometheus_client's Counter, Gauge, Histogram,
    GaugeMetricFamily, CounterMetricFamily, and of the NATS exporter's _gauge)."""
    names = set()
    for path in (ROOT / "src" / "amoskys").rglob("*.py"):
        declared = r"\b(?:Counter|Gauge|Histogram|GaugeMetricFamily|CounterMetricFamily|_gauge)\(\s*\"(amoskys_\w+)\""
        names |= set(re.findall(declared, path.read_text()))
    return names


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_metrics()
    assert {"amoskys_bus_rejected", "amoskys_agent_connected", "amoskys_nats_up"} <= exported  # the scan works
    rules = [rule for group in load(RULES)["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in rules} >= {
        "AmoskysHubDown", "AmoskysAgentDown", "AmoskysAgentEventsDropped",
        "AmoskysNatsDown", "AmoskysNatsRoutesMissing", "AmoskysNatsJetStreamUnhealthy",
    }  # fmt: skip
    for rule in rules:
        for metric in re.findall(r"(?<![\"\w])amoskys_\w+", rule["expr"]):
            base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
            assert base in exported, f"{rule['alert']}: {metric} is not exported by any amoskys component"
        assert re.search(r'component="amoskys_(hub|agent|indexer|nats)"', rule["expr"]), rule["alert"]


def facts_set_by_tasks() -> set[str]:
    """Names the roles' tasks set with set_fact: they do not exist before those tasks run."""
    names: set[str] = set()
    for path in (ROOT / "roles").glob("*/tasks/*.yml"):
        for task in load(path) or []:
            names |= set(task.get("ansible.builtin.set_fact") or {}) - {"cacheable"}
    return names


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_defaults_survive_argument_validation(role: Path) -> None:
    """A role's argument validation (its first task) templates its defaults before any of its tasks ran, so a
    default built on a fact a task sets must say what it is until then (`| default(...)`): without it
    `make lab` failed at once ('amoskys_common_agent_kinds' is undefined)."""
    facts = facts_set_by_tasks()
    for name, value in (load(role / "defaults" / "main.yml") or {}).items():
        for fact in facts:
            for use in re.finditer(rf"\b{re.escape(fact)}\b(?!\s*\|\s*default\()", str(value)):
                pytest.fail(f"{role.name}: {name} uses {fact} (set by a task) without | default(...): {use.string}")


def test_metrics_ports_do_not_collide() -> None:
    """The hub, indexer, NATS (client, route, monitoring) and its exporter, and every agent kind: a port each."""
    defaults = load(ROOT / "roles" / "amoskys_common" / "defaults" / "main.yml")
    defaults |= load(ROOT / "roles" / "amoskys_nats" / "defaults" / "main.yml")
    ports = [value for name, value in defaults.items() if name.endswith("_port") and isinstance(value, int)]
    ports.append(int(defaults["amoskys_nats_monitor_listen"].rpartition(":")[2]))
    ports += [kind.metrics_port for kind in AGENT_KINDS.values()]
    assert defaults["amoskys_common_nats_exporter_metrics_port"] in ports
    assert len(ports) == len(set(ports)), sorted(ports)


def test_nats_exporter_user_is_the_units() -> None:
    users = load(ROOT / "roles" / "amoskys_common" / "vars" / "main.yml")
    unit = (ROOT / "systemd" / "amoskys-nats-exporter.service").read_text()
    assert f"\nUser={users['amoskys_common_nats_exporter_user']}\n" in unit
