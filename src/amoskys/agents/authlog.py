"""Parsing Debian auth.log lines (rsyslog RFC 3339 or classic BSD timestamps) into AuthEvents."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from amoskys.v1 import events_pb2

__all__ = ["ParsedLine", "parse_line", "parse_message"]

Kind = events_pb2.AuthEvent.Kind
PREFIX = re.compile(
    r"^(?:(?P<iso>\d{4}-\d\d-\d\dT\S+)|(?P<bsd>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)) (?P<host>\S+) "
    r"(?P<program>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?: (?P<message>.*)$"
)


@dataclass(frozen=True, slots=True)
class ParsedLine:
    auth: events_pb2.AuthEvent
    severity: int


def _sshd(message: str, auth: events_pb2.AuthEvent) -> bool:
    patterns: list[tuple[str, int]] = [
        (r"^Accepted (?P<method>\S+) for (?P<user>\S+) from (?P<ip>\S+) port (?P<port>\d+)", Kind.SSH_ACCEPTED),
        (
            r"^Failed (?P<method>\S+) for invalid user (?P<user>\S*) from (?P<ip>\S+) port (?P<port>\d+)",
            Kind.SSH_FAILED,
        ),
        (r"^Failed (?P<method>\S+) for (?P<user>\S+) from (?P<ip>\S+) port (?P<port>\d+)", Kind.SSH_FAILED),
        (r"^Invalid user (?P<user>\S*) from (?P<ip>\S+) port (?P<port>\d+)", Kind.SSH_INVALID_USER),
    ]
    for pattern, kind in patterns:
        match = re.match(pattern, message)
        if match:
            fields = match.groupdict()
            auth.kind = kind  # type: ignore[assignment]
            auth.user, auth.src_ip, auth.src_port = fields["user"], fields["ip"], int(fields["port"])
            auth.method = fields.get("method") or ""
            return True
    return False


SUDO = re.compile(
    r"^\s*(?P<user>\S+) : (?:(?P<failure>[^;]*?) ; )?TTY=(?P<tty>\S+) ; PWD=.*? ; USER=(?P<target>\S+) ; "
    r"(?:\S+=.*? ; )*COMMAND=(?P<command>.*)$"
)


def _sudo(message: str, auth: events_pb2.AuthEvent) -> bool:
    match = SUDO.match(message)
    if not match:
        return False
    auth.kind = Kind.SUDO_FAILED if match.group("failure") else Kind.SUDO
    auth.user, auth.target_user = match.group("user"), match.group("target")
    auth.tty, auth.command = match.group("tty"), match.group("command")
    auth.method = (match.group("failure") or "").strip()
    return True


def _su(message: str, auth: events_pb2.AuthEvent) -> bool:
    match = re.match(r"^(?P<failed>FAILED SU )?\(to (?P<target>\S+)\) (?P<user>\S+) on (?P<tty>\S+)", message)
    if not match:
        return False
    auth.kind = Kind.SU
    auth.user, auth.target_user, auth.tty = match.group("user"), match.group("target"), match.group("tty")
    auth.method = "failed" if match.group("failed") else ""
    return True


ACCOUNT_PATTERNS: list[tuple[str, int]] = [
    (r"^new user: name=(?P<user>[^,]+),", Kind.USER_ADDED),
    (r"^new group: name=(?P<group>[^,]+),", Kind.GROUP_ADDED),
    (r"^delete user '(?P<user>[^']+)'", Kind.USER_DELETED),
    (r"^(?:group '(?P<group>[^']+)' removed|removed group '(?P<group2>[^']+)')", Kind.GROUP_DELETED),
    (r"^add '(?P<user>[^']+)' to (?:shadow )?group '(?P<group>[^']+)'", Kind.USER_MODIFIED),
    (r"^change user '(?P<user>[^']+)'", Kind.USER_MODIFIED),
    (r"^pam_unix\((?:passwd|chpasswd):chauthtok\): password changed for (?P<user>\S+)", Kind.PASSWORD_CHANGED),
    (
        r"^pam_unix\((?P<service>[^:)]+):session\): session (?P<what>opened|closed) for user (?P<user>[^\s(]+)",
        Kind.SESSION_OPENED,
    ),
]


def _account(message: str, auth: events_pb2.AuthEvent) -> bool:
    for pattern, kind in ACCOUNT_PATTERNS:
        match = re.match(pattern, message)
        if not match:
            continue
        fields = {k: v for k, v in match.groupdict().items() if v}
        auth.kind = kind  # type: ignore[assignment]
        if fields.get("what") == "closed":
            auth.kind = Kind.SESSION_CLOSED
        auth.user = fields.get("user", "")
        auth.group = fields.get("group", fields.get("group2", ""))
        auth.method = fields.get("service", "")
        return True
    return False


PARSERS: dict[str, list[Callable[[str, events_pb2.AuthEvent], bool]]] = {
    "sshd": [_sshd, _account],
    "sudo": [_sudo, _account],
    "su": [_su, _account],
}
SEVERITY = {
    Kind.SSH_FAILED: events_pb2.SEVERITY_NOTICE,
    Kind.SSH_INVALID_USER: events_pb2.SEVERITY_NOTICE,
    Kind.SUDO_FAILED: events_pb2.SEVERITY_WARNING,
    Kind.USER_ADDED: events_pb2.SEVERITY_NOTICE,
    Kind.USER_DELETED: events_pb2.SEVERITY_NOTICE,
    Kind.USER_MODIFIED: events_pb2.SEVERITY_NOTICE,
    Kind.GROUP_ADDED: events_pb2.SEVERITY_NOTICE,
    Kind.GROUP_DELETED: events_pb2.SEVERITY_NOTICE,
    Kind.PASSWORD_CHANGED: events_pb2.SEVERITY_NOTICE,
}


def parse_message(program: str, pid: int, message: str, raw: str) -> ParsedLine | None:
    """An AuthEvent for a message from `program`, or None when it is not an auth event we know."""
    auth = events_pb2.AuthEvent(program=program, pid=pid, raw=raw[:4096])
    for parser in PARSERS.get(program, [_account]):
        if parser(message, auth):
            if auth.kind == Kind.SU and auth.method == "failed":
                return ParsedLine(auth, events_pb2.SEVERITY_WARNING)
            return ParsedLine(auth, SEVERITY.get(auth.kind, events_pb2.SEVERITY_INFO))
    return None


def parse_line(line: str) -> ParsedLine | None:
    match = PREFIX.match(line.rstrip("\n"))
    if not match:
        return None
    pid = int(match.group("pid")) if match.group("pid") else 0
    return parse_message(match.group("program"), pid, match.group("message"), line.rstrip("\n"))
