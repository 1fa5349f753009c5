"""systemd keeps the units running: reload keeps the process, kill -9 gets a new one, events still flow after."""

from __future__ import annotations

import pytest
from fleet import (
    AUTH_HOSTS,
    HOST_UNITS,
    INDEXER,
    NATS_EXPORTER,
    PROC_HOSTS,
    every_agent_up,
    failed_ssh_login_reaches_hub,
    ids,
    machine,
    main_pid,
    new_process_reaches_hub,
    unit_property,
    wait_until,
)


def active_with_pid(name: str, unit: str) -> int | None:
    """The unit's MainPID once it is active (not reloading, activating or failed), else None."""
    if unit_property(name, unit, "ActiveState") != "active":
        return None
    return main_pid(name, unit) or None


# The indexer and the NATS exporter have no reload (ExecReload=): a new identity or config restarts them.
RELOADABLE = [(name, unit) for name, unit in HOST_UNITS if unit not in (INDEXER, NATS_EXPORTER)]


@pytest.mark.parametrize(("name", "unit"), RELOADABLE, ids=ids(RELOADABLE))
def test_reload_keeps_main_process(name: str, unit: str) -> None:
    before = wait_until(lambda: active_with_pid(name, unit), timeout=30, what=f"{unit} active")
    restarts = unit_property(name, unit, "NRestarts")
    machine(name).check_output(f"systemctl reload {unit}")
    after = wait_until(lambda: active_with_pid(name, unit), timeout=30, what=f"{unit} active after reload")
    assert after == before, f"{unit}: reload replaced MainPID {before} with {after}"
    assert unit_property(name, unit, "NRestarts") == restarts


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_kill_9_is_restarted(name: str, unit: str) -> None:
    before = wait_until(lambda: active_with_pid(name, unit), timeout=30, what=f"{unit} active")
    restarts = int(unit_property(name, unit, "NRestarts"))
    machine(name).check_output(f"kill -9 {before}")
    after = wait_until(
        lambda: (pid := active_with_pid(name, unit)) and pid != before and pid,
        timeout=60,
        interval=0.5,
        what=f"{unit} restarted after kill -9 of {before}",
    )
    assert after != before
    assert int(unit_property(name, unit, "NRestarts")) == restarts + 1


@pytest.mark.parametrize("agent_host", AUTH_HOSTS)
def test_logins_still_reach_hub_after_restarts(agent_host: str) -> None:
    failed_ssh_login_reaches_hub(agent_host)


@pytest.mark.parametrize("agent_host", PROC_HOSTS)
def test_processes_still_reach_hub_after_restarts(agent_host: str) -> None:
    new_process_reaches_hub(agent_host)


def test_every_agent_up_after_restarts() -> None:
    every_agent_up()
