"""proc's alert rules: what about a process start is worth an alert. Each has a stable id, a severity
and settings under `proc.rules.NAME` (`enabled`, `severity`, `ignore_exes`, and its own).

Severity scale for alerts (README, "proc rules"): `warning` is unusual and worth a look but has
innocent explanations; `error` is very likely misuse; `critical` is an attack in progress with
high confidence. A login (sshd starting a shell) is not an alert: sshd is no web daemon.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from amoskys.agents.proc.config import ProcRule, ProcRules
from amoskys.semantics import severity_value
from amoskys.v1 import events_pb2

__all__ = ["RULES", "Finding", "ProcessTable", "Rule", "Subject", "evaluate", "network_peer"]

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "csh", "tcsh", "ash", "busybox"})


class ProcessTable(Protocol):
    """What the rules may ask the agent about other processes."""

    def name_of(self, pid: int) -> str: ...

    def ppid_of(self, pid: int) -> int: ...

    def pipe_peers(self, pipe: str, stdout: bool) -> Iterable[events_pb2.ProcessEvent]:
        """Live or recently exited processes whose stdout (or stdin) is `pipe`, e.g. "pipe:[1234]"."""
        ...


class Subject(NamedTuple):
    """One process start as the rules see it."""

    info: events_pb2.ProcessEvent
    stdin: str  # where fd 0 points: "socket:[N]", "pipe:[N]", "/dev/pts/0", ...
    stdout: str
    table: ProcessTable
    exe_mtime_ns: int | None = None  # of the file that ran, as read at its exec (None: not known)


class Finding(NamedTuple):
    rule: str
    severity: int
    summary: str
    details: dict[str, str]


Check = Callable[[Subject, ProcRules], tuple[str, dict[str, str]] | None]


@dataclass(frozen=True, slots=True)
class Rule:
    id: str  # proc.NAME, NAME being the key under proc.rules
    severity: str
    description: str
    check: Check

    @property
    def key(self) -> str:
        return self.id.removeprefix("proc.")


def _matches(patterns: Iterable[str], name: str) -> bool:
    """Whether `name` matches one of the glob `patterns` (as fnmatch.fnmatchcase)."""
    pattern = _one_pattern(tuple(patterns))
    return bool(name) and pattern is not None and pattern.match(name) is not None


@functools.lru_cache(maxsize=64)
def _one_pattern(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """The globs as one regular expression: one match for each exec instead of one per pattern."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)) if patterns else None


def _who(info: events_pb2.ProcessEvent) -> str:
    return f"{info.name or '?'} ({info.pid})"


# ---- the checks -----------------------------------------------------------------------------------


def shell_from_web_daemon(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    info = subject.info
    if info.name not in SHELLS or not _matches(rules.shell_from_web_daemon.daemons, info.parent_name):
        return None
    return f"shell {_who(info)} started by {info.parent_name} ({info.ppid})", {"parent": info.parent_name}


def child_of_daemon_shell(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    info, table = subject.info, subject.table
    if info.parent_name not in SHELLS:
        return None
    grandparent = table.name_of(table.ppid_of(info.ppid))
    if not _matches(rules.shell_from_web_daemon.daemons, grandparent):
        return None
    summary = f"{_who(info)} run by shell {info.parent_name} ({info.ppid}) of {grandparent}"
    return summary, {"parent": info.parent_name, "grandparent": grandparent}


def reverse_shell(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    info = subject.info
    if not _matches(rules.reverse_shell.interpreters, info.name) or not subject.stdin.startswith("socket:["):
        return None
    peer = network_peer(info.pid, subject.stdin)
    if peer is None:
        return None  # a unix socket (a pipe-like local channel), not the network
    return f"{_who(info)} reads its input from a network connection to {peer}", {"remote": peer}


def download_piped_to_shell(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    info, settings, table = subject.info, rules.download_piped_to_shell, subject.table
    if _matches(settings.shells, info.name) and subject.stdin.startswith("pipe:["):
        peers = [p for p in table.pipe_peers(subject.stdin, True) if _matches(settings.downloaders, p.name)]
        pair = (info, peers[0]) if peers else None
    elif _matches(settings.downloaders, info.name) and subject.stdout.startswith("pipe:["):
        peers = [p for p in table.pipe_peers(subject.stdout, False) if _matches(settings.shells, p.name)]
        pair = (peers[0], info) if peers else None
    else:
        return None
    if pair is None:
        return None  # the other end is not known yet: it raises the alert when it starts
    shell, downloader = pair
    summary = f"{_who(downloader)} pipes a download into {_who(shell)}: {' '.join(downloader.cmdline)}"
    return summary, {"downloader": " ".join(downloader.cmdline), "shell_pid": str(shell.pid)}


def exe_deleted(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    info = subject.info
    if not info.exe_deleted or os.path.exists(info.exe):
        return None  # not deleted, or replaced by an upgrade (the old inode runs on, harmlessly)
    return f"{_who(info)} runs {info.exe}, which was deleted and not replaced", {}


def exe_in_writable_dir(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    exe = subject.info.exe
    if not exe.startswith("/"):
        return None
    directory = os.path.dirname(exe)
    listed = any(exe.startswith(d.rstrip("/") + "/") for d in rules.exe_in_writable_dir.dirs)
    try:
        world_writable = bool(os.stat(directory).st_mode & stat.S_IWOTH)
    except OSError:
        world_writable = False
    if not (listed or world_writable):
        return None
    return f"{_who(subject.info)} runs from {directory}, where anyone can write", {"directory": directory}


def new_binary(subject: Subject, rules: ProcRules) -> tuple[str, dict[str, str]] | None:
    info = subject.info
    if not info.exe:
        return None
    modified = _exe_mtime(subject)
    if modified is None:
        return None
    age = time.time() - modified
    if age > rules.new_binary.minutes * 60:
        return None
    return f"{_who(info)} runs {info.exe}, modified {age:.0f} s ago", {"modified_s_ago": f"{age:.0f}"}


def _exe_mtime(subject: Subject) -> float | None:
    """When the file that ran was modified: as read at its exec (a short process is gone by now), else now."""
    if subject.exe_mtime_ns is not None:
        return subject.exe_mtime_ns / 1e9
    try:  # the running file itself, even if its path now names another
        return os.stat(f"/proc/{subject.info.pid}/exe").st_mtime
    except OSError:
        return None


RULES = (
    Rule("proc.reverse_shell", "critical",
         "a shell or interpreter whose standard input is a network connection (TCP/UDP socket)", reverse_shell),
    Rule("proc.shell_from_web_daemon", "warning",
         "a shell whose parent is a web or database daemon (`daemons`): a web shell or command injection",
         shell_from_web_daemon),
    Rule("proc.child_of_daemon_shell", "warning",
         "a process started by such a shell: the commands run through it", child_of_daemon_shell),
    Rule("proc.download_piped_to_shell", "error",
         "a downloader (curl, wget, ...) whose output is piped into a shell or interpreter", download_piped_to_shell),
    Rule("proc.exe_deleted", "error",
         "the running executable was deleted and nothing replaced it (an upgrade replaces it: no alert)", exe_deleted),
    Rule("proc.exe_in_writable_dir", "warning",
         "the executable lies under /tmp, /var/tmp, /dev/shm (`dirs`) or in a world-writable directory",
         exe_in_writable_dir),
    Rule("proc.new_binary", "warning",
         "the executable was modified less than `minutes` (10) ago: freshly downloaded or built", new_binary),
)  # fmt: skip


def _settings(rules: ProcRules, rule: Rule) -> ProcRule:
    settings: ProcRule = getattr(rules, rule.key)
    return settings


def evaluate(rules: ProcRules, subject: Subject, only: frozenset[str] | None = None) -> list[Finding]:
    """The findings of the enabled rules (or of the `only` ones) for one process."""
    findings = []
    for rule in RULES:
        settings = _settings(rules, rule)
        if (only is not None and rule.key not in only) or not settings.enabled:
            continue
        if _matches(settings.ignore_exes, subject.info.exe):
            continue
        found = rule.check(subject, rules)
        if found is not None:
            summary, extra = found
            details = _details(subject.info) | extra
            findings.append(Finding(rule.id, severity_value(settings.severity or rule.severity), summary, details))
    return findings


def _details(info: events_pb2.ProcessEvent) -> dict[str, str]:
    return {
        "pid": str(info.pid), "ppid": str(info.ppid), "name": info.name, "exe": info.exe, "user": info.user,
        "cmdline": " ".join(info.cmdline),
    }  # fmt: skip


# ---- sockets ----------------------------------------------------------------------------------------


def network_peer(pid: int, link: str) -> str | None:
    """The remote address of socket `link` ("socket:[inode]") if it is TCP or UDP in the process's namespace."""
    inode = link.removeprefix("socket:[").removesuffix("]")
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as handle:
                next(handle, None)  # the header
                for line in handle:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] == inode:
                        return _address(fields[2])
        except OSError:
            continue
    return None


def _address(hex_address: str) -> str:
    """/proc/net/tcp's "0100007F:115C" as "127.0.0.1:4444" (addresses are in host byte order words)."""
    address, port = hex_address.split(":")
    raw = b"".join(int(address[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(address), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # an IPv4 peer of a dual-stack socket
    return f"[{ip}]:{int(port, 16)}" if ip.version == 6 else f"{ip}:{int(port, 16)}"
