"""proc's settings: polling, hashing and the alert rules' switches (section `proc` of agent-proc.yml)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from amoskys.config import AgentConfig, MiB, NonNegative, Seconds, Section

__all__ = ["ProcAgentConfig", "ProcConfig", "ProcRule", "ProcRules"]

AlertSeverity = Literal["warning", "error", "critical"]


class ProcRule(Section, frozen=True):
    """One proc rule's switch; `severity` empty keeps the rule's own (see README, "proc rules")."""

    enabled: bool = True
    severity: AlertSeverity | Literal[""] = ""
    ignore_exes: list[str] = msgspec.field(default_factory=list)  # glob patterns of executables never alerted on


WEB_DAEMONS = [
    "nginx", "apache2", "httpd", "php-fpm*", "php-cgi*", "postgres", "mysqld", "mariadbd", "node", "java",
    "tomcat*", "gunicorn", "uwsgi", "puma", "unicorn", "lighttpd", "caddy", "redis-server", "mongod",
]  # fmt: skip


class DaemonShellRule(ProcRule, frozen=True):
    daemons: list[str] = msgspec.field(default_factory=lambda: list(WEB_DAEMONS))  # process names, globs


class WritableDirRule(ProcRule, frozen=True):
    dirs: list[str] = msgspec.field(default_factory=lambda: ["/tmp", "/var/tmp", "/dev/shm"])


class NewBinaryRule(ProcRule, frozen=True):
    minutes: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # an executable modified less than this long ago


INTERPRETERS = [
    "sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "python*", "perl*", "ruby*", "php*", "lua*", "node",
    "tclsh*", "nc", "ncat", "netcat", "socat", "telnet", "openssl",
]  # fmt: skip


class InterpreterRule(ProcRule, frozen=True):
    interpreters: list[str] = msgspec.field(default_factory=lambda: list(INTERPRETERS))


class DownloadToShellRule(ProcRule, frozen=True):
    downloaders: list[str] = msgspec.field(default_factory=lambda: ["curl", "wget", "fetch", "lwp-request"])
    shells: list[str] = msgspec.field(
        default_factory=lambda: ["sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "python*", "perl*"]
    )


RUNC_MEMFD = "/memfd:runc_cloned*"  # runc before 1.2 runs a copy of itself from a memfd for every container


class ProcRules(Section, frozen=True):
    shell_from_web_daemon: DaemonShellRule = DaemonShellRule()
    child_of_daemon_shell: ProcRule = ProcRule()
    reverse_shell: InterpreterRule = InterpreterRule()
    download_piped_to_shell: DownloadToShellRule = DownloadToShellRule()
    exe_deleted: ProcRule = ProcRule(ignore_exes=[RUNC_MEMFD])
    exe_in_writable_dir: WritableDirRule = WritableDirRule()
    new_binary: NewBinaryRule = NewBinaryRule(ignore_exes=[RUNC_MEMFD])


class ProcConfig(Section, frozen=True):
    interval_s: Seconds = 2.0  # polling, where kernel process events are unavailable
    recheck_s: Seconds = 1.0  # how often running executables are checked for deletion
    hash_max_bytes: NonNegative = 64 * MiB
    # the event reader's CPU share per second at real-time priority (where the unit gives it), then it pauses for
    # the rest of the second (0: it gives real-time up at its start)
    realtime_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    rules: ProcRules = ProcRules()


class ProcAgentConfig(AgentConfig, frozen=True):
    proc: ProcConfig = ProcConfig()
