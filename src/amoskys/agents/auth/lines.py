"""Auth log lines into AuthEvents: the line's own time, and what sshd, sudo, su, shadow's tools and
systemd-logind write (README, section auth, has the table of formats and events).

Lines come as rsyslog writes them (RFC 3339 time with zone, as in its default file format, or the
classic yearless `Nov 22 10:15:01`), as RFC 5424 (`<PRI>1 TIME HOST APP PROCID MSGID SD MSG`), or
from the journal (`parse_message` with `__REALTIME_TIMESTAMP`).
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from amoskys.v1 import events_pb2

__all__ = ["Failures", "ParsedLine", "bsd_time_ns", "iso_time_ns", "line_time_ns", "parse_line", "parse_message"]

Auth = events_pb2.AuthEvent  # kinds as class attributes: AuthEvent.Kind.X is a slow lookup on every use
# A yearless time further ahead of the clock than this is last year's. A day, not minutes: a writer in
# another zone (a container in UTC) is hours off, and must not be put a year back.
FUTURE_SKEW = dt.timedelta(days=1)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MONTHS = {name: number for number, name in enumerate(MONTH_NAMES, 1)}  # RFC 3164: English, whatever the locale
RFC5424 = re.compile(
    r"^<\d{1,3}>1 (?P<time>\S+) (?P<host>\S+) (?P<program>\S+) (?P<pid>\S+) \S+ "
    r"(?:-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: \ufeff?(?P<message>.*))?$"
)
TRADITIONAL = re.compile(
    r"^(?:<\d{1,3}>)?(?:(?P<time>\d{4}-\d\d-\d\dT\S+)|(?P<month>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) "
    r"(?P<clock>\d\d:\d\d:\d\d)(?:\.\d+)?) (?P<host>\S+) (?P<program>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?: ?(?P<message>.*)$"
)
HOUR_NS = 3_600_000_000_000
TIME_CACHE: dict[tuple[str, int, tuple[str, str]], int] = {}
REPEATED = re.compile(r"^message repeated (?P<count>\d+) times: \[ ?(?P<message>.*)\]$")


@dataclass(frozen=True, slots=True)
class Failures:
    """Failed authentication attempts a line shows for its connection (the brute-force rule's input).

    `new`: attempts this line adds (a `Failed ...` line is one more). `at_least`: the connection's
    total is at least this (an `Invalid user`, a close before authentication, `PAM 2 more ...`: 3).
    """

    new: int = 0
    at_least: int = 0


NO_FAILURE = Failures()


@dataclass(frozen=True, slots=True)
class ParsedLine:
    auth: events_pb2.AuthEvent
    severity: int
    ts_ns: int = 0  # the log's own time; 0 when the line carries none that can be read
    repeats: int = 1  # rsyslog's "message repeated N times: [...]" stands for N lines
    failures: Failures = NO_FAILURE


# ---- time ----------------------------------------------------------------------------------------


def iso_time_ns(text: str) -> int:
    """RFC 3339 / ISO 8601 (rsyslog, RFC 5424) in ns; without a zone it is local time. ValueError if not one."""
    moment = dt.datetime.fromisoformat(text)
    return (moment.astimezone() - EPOCH) // dt.timedelta(microseconds=1) * 1000


def bsd_time_ns(month: str, day: int, clock: str, now_ns: int) -> int:
    """RFC 3164's yearless local time: the latest year that does not put it beyond `now` + a small skew.

    So a December line read in January is last year's, and 29 February goes back to a leap year.
    """
    latest = dt.datetime.fromtimestamp(now_ns / 1e9).astimezone() + FUTURE_SKEW
    hour, minute, second = (int(part) for part in clock.split(":"))
    for year in range(latest.year, latest.year - 8, -1):
        try:
            moment = dt.datetime(year, MONTHS[month], day, hour, minute, second).astimezone()
        except ValueError:  # no such day that year (29 February)
            continue
        if moment <= latest:
            return (moment - EPOCH) // dt.timedelta(seconds=1) * 1_000_000_000
    raise ValueError(f"{month} {day} {clock} is not a date")


def line_time_ns(fields: dict[str, str | None], now_ns: int) -> int:
    """The time of a matched line, or 0 when it cannot be read (the caller uses the arrival time)."""
    stamp = fields.get("time") or f"{fields['month']} {fields['day']} {fields['clock']}"
    key = (stamp, now_ns // HOUR_NS, time.tzname)  # lines share their second: parse each once
    if (known := TIME_CACHE.get(key)) is not None:
        return known
    try:
        if fields.get("time"):
            ts_ns = iso_time_ns(stamp)
        else:
            ts_ns = bsd_time_ns(str(fields["month"]), int(str(fields["day"])), str(fields["clock"]), now_ns)
    except (ValueError, KeyError, OverflowError):
        ts_ns = 0
    if len(TIME_CACHE) >= 4096:
        TIME_CACHE.clear()
    TIME_CACHE[key] = ts_ns
    return ts_ns


# ---- sshd ----------------------------------------------------------------------------------------

# User names are what the client sent (spaces included) and come before the address sshd writes, so
# they are matched greedily up to the last " from ADDR port N": a user cannot forge the address.
USER = r"(?P<user>.*)"
INVALID = r"(?P<invalid>(?:invalid|illegal) user )?"
ADDR_PORT = r"(?P<ip>\S+) port (?P<port>\d+)"
SSHD: list[tuple[re.Pattern[str], int, str, Failures]] = [
    (re.compile(rf"^Accepted (?P<method>\S+) for {USER} from {ADDR_PORT}(?: ssh[12])?(?:: .*)?$"),
     Auth.SSH_ACCEPTED, "", NO_FAILURE),
    (re.compile(rf"^Failed (?P<method>\S+) for {INVALID}{USER} from {ADDR_PORT}(?: ssh[12])?(?:: .*)?$"),
     Auth.SSH_FAILED, "", Failures(new=1)),
    (re.compile(rf"^(?:Invalid|Illegal) user {USER} from (?P<ip>\S+)(?: port (?P<port>\d+))?$"),
     Auth.SSH_INVALID_USER, "", Failures(at_least=1)),
    (re.compile(rf"^User {USER} from (?P<ip>\S+) not allowed because (?P<method>.+)$"),
     Auth.SSH_INVALID_USER, "", Failures(at_least=1)),
    (re.compile(rf"^(?P<method>Connection closed by|Disconnected from|Connection reset by) "
                rf"(?P<invalid>invalid|authenticating) user {USER} {ADDR_PORT}$"),
     Auth.SSH_FAILED, "", Failures(at_least=1)),
    (re.compile(rf"^maximum authentication attempts exceeded for {INVALID}{USER} from {ADDR_PORT}(?: ssh2)?$"),
     Auth.SSH_FAILED, "max-attempts", Failures(at_least=1)),
    (re.compile(rf"^Disconnecting (?:invalid|authenticating) user {USER} {ADDR_PORT}: "
                r"Too many authentication failures$"),
     Auth.SSH_FAILED, "too-many", Failures(at_least=1)),
    (re.compile(rf"^Disconnecting: Too many authentication failures(?: for {INVALID}{USER})?$"),
     Auth.SSH_FAILED, "too-many", NO_FAILURE),
    (re.compile(r"^PAM (?P<more>\d+) more authentication failures?; .*?rhost=(?P<ip>\S*)(?:\s+user=(?P<user>.*))?$"),
     Auth.SSH_FAILED, "pam", Failures(at_least=1)),
    (re.compile(rf"^PAM: Authentication failure for {INVALID}{USER} from (?P<ip>\S+)$"),
     Auth.SSH_FAILED, "pam", Failures(at_least=1)),
    (re.compile(r"^ROOT LOGIN REFUSED FROM (?P<ip>\S+?)(?: port (?P<port>\d+))?$"),
     Auth.SSH_FAILED, "root-refused", Failures(at_least=1)),
]  # fmt: skip
CLOSE_TAGS = {"Connection closed by": "closed", "Disconnected from": "disconnected", "Connection reset by": "reset"}


@functools.lru_cache(maxsize=4096)
def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return False
    return True


def _sshd(message: str, auth: events_pb2.AuthEvent) -> Failures | None:
    message = message.removeprefix("error: ").removesuffix(" [preauth]")
    for pattern, kind, tag, failures in SSHD:
        match = pattern.match(message)
        if not match:
            continue
        fields = {name: value for name, value in match.groupdict().items() if value is not None}
        auth.kind = kind  # type: ignore[assignment]
        auth.user = fields.get("user", "root" if tag == "root-refused" else "")
        auth.src_port = int(fields.get("port", 0))
        method = fields.get("method", "")
        auth.method = tag or CLOSE_TAGS.get(method, method)
        address = fields.get("ip", "")
        auth.src_ip = address if _is_address(address) else ""  # a host name (UseDNS) is not an address
        if "more" in fields:
            return Failures(at_least=int(fields["more"]) + 1)
        return failures
    return None


# ---- sudo, su, PAM -------------------------------------------------------------------------------

SUDO = re.compile(
    r"^\s*(?P<user>\S+) : (?:(?P<failure>[^;]*?) ; )?TTY=(?P<tty>\S+) ; PWD=.*? ; USER=(?P<target>\S+) ; "
    r"(?:\S+=.*? ; )*COMMAND=(?P<command>.*)$"
)


def _sudo(message: str, auth: events_pb2.AuthEvent) -> Failures | None:
    match = SUDO.match(message)
    if not match:
        return None
    auth.kind = Auth.SUDO_FAILED if match.group("failure") else Auth.SUDO
    auth.user, auth.target_user = match.group("user"), match.group("target")
    auth.tty, auth.command = match.group("tty"), match.group("command")
    auth.method = (match.group("failure") or "").strip()
    return NO_FAILURE


SU = [  # util-linux su, then shadow's su (older Debian/Ubuntu)
    re.compile(r"^(?P<failed>FAILED SU )?\(to (?P<target>\S+)\) (?P<user>\S+) on (?P<tty>\S+)$"),
    re.compile(r"^(?:Successful|(?P<failed>FAILED)) su for (?P<target>\S+) by (?P<user>\S+)$"),
]


def _su(message: str, auth: events_pb2.AuthEvent) -> Failures | None:
    for pattern in SU:
        match = pattern.match(message)
        if match:
            auth.kind = Auth.SU
            auth.user, auth.target_user = match.group("user"), match.group("target")
            auth.tty = match.groupdict().get("tty") or ""
            auth.method = "failed" if match.group("failed") else ""
            return NO_FAILURE
    return None


PAM_SESSION = re.compile(
    r"^pam_unix\((?P<service>[^:)]+):session\): session (?P<what>opened|closed) for user (?P<user>[^\s(]+)"
)
PAM_AUTH_FAILURE = re.compile(
    r"^pam_unix\((?P<service>su|su-l|sudo|sudo-i):auth\): authentication failure; "
    r"logname=(?P<logname>\S*) .*?ruser=(?P<ruser>\S*) .*?user=(?P<user>\S+)$"
)


def _pam(message: str, auth: events_pb2.AuthEvent) -> Failures | None:
    if match := PAM_SESSION.match(message):
        auth.kind = Auth.SESSION_OPENED if match.group("what") == "opened" else Auth.SESSION_CLOSED
        auth.user, auth.method = match.group("user"), match.group("service")
        return NO_FAILURE
    if match := PAM_AUTH_FAILURE.match(message):
        caller = match.group("ruser") or match.group("logname") or match.group("user")
        if match.group("service") in ("su", "su-l"):  # user= is the account asked for
            auth.kind, auth.method = Auth.SU, "failed"
            auth.user, auth.target_user = caller, match.group("user")
        else:  # sudo asks for the caller's own password
            auth.kind, auth.method, auth.user = Auth.SUDO_FAILED, "pam: authentication failure", caller
        return NO_FAILURE
    return None


# ---- shadow's tools (useradd, usermod, userdel, groupadd, groupdel, passwd, chpasswd, chage, gpasswd) --

# Their per-file lines ("group added to /etc/group: ...", "group 'x' removed from /etc/gshadow") are
# left out: each is followed by the one summary line mapped here.
ACCOUNT: list[tuple[re.Pattern[str], int]] = [
    (re.compile(r"^new user: name=(?P<user>[^,]+),"), Auth.USER_ADDED),
    (re.compile(r"^new group: name=(?P<group>[^,]+),"), Auth.GROUP_ADDED),
    (re.compile(r"^delete user '(?P<user>[^']+)'$"), Auth.USER_DELETED),
    (re.compile(r"^(?:group '(?P<group>[^']+)' removed|removed group '(?P<group2>[^']+)' owned by '[^']*')$"),
     Auth.GROUP_DELETED),
    (re.compile(r"^(?:add|delete) '(?P<user>[^']+)' (?:to|from) (?:shadow )?group '(?P<group>[^']+)'$"),
     Auth.USER_MODIFIED),
    (re.compile(r"^user (?P<user>\S+) (?:added|removed) by \S+ (?:to|from) group (?P<group>\S+)$"), Auth.USER_MODIFIED),
    (re.compile(r"^(?:change user|lock user|unlock user) '(?P<user>[^']+)'"), Auth.USER_MODIFIED),
    (re.compile(r"^change user name '[^']+' to '(?P<user>[^']+)'$"), Auth.USER_MODIFIED),
    (re.compile(r"^changed password expiry for (?P<user>\S+)$"), Auth.USER_MODIFIED),
    (re.compile(r"^pam_unix\((?:passwd|chpasswd):chauthtok\): password changed for (?P<user>\S+)$"),
     Auth.PASSWORD_CHANGED),
    (re.compile(r"^password for '(?P<user>[^']+)' changed by '[^']+'$"), Auth.PASSWORD_CHANGED),
]  # fmt: skip


def _account(message: str, auth: events_pb2.AuthEvent) -> Failures | None:
    for pattern, kind in ACCOUNT:
        match = pattern.match(message)
        if match:
            fields = {name: value for name, value in match.groupdict().items() if value}
            auth.kind = kind  # type: ignore[assignment]
            auth.user = fields.get("user", "")
            auth.group = fields.get("group", fields.get("group2", ""))
            return NO_FAILURE
    return None


LOGIND = [
    (re.compile(r"^New session (?P<session>\S+) of user (?P<user>.+)\.$"), Auth.SESSION_OPENED),
    (re.compile(r"^Removed session (?P<session>\S+)\.$"), Auth.SESSION_CLOSED),
]


def _logind(message: str, auth: events_pb2.AuthEvent) -> Failures | None:
    for pattern, kind in LOGIND:
        match = pattern.match(message)
        if match:
            auth.kind = kind
            auth.user = match.groupdict().get("user") or ""
            auth.method, auth.tty = "logind", f"session {match.group('session')}"
            return NO_FAILURE
    return None


Parser = Callable[[str, events_pb2.AuthEvent], Failures | None]
SSHD_PARSERS: list[Parser] = [_sshd, _pam]
PARSERS: dict[str, list[Parser]] = {
    "sshd": SSHD_PARSERS,
    "sshd-session": SSHD_PARSERS,  # OpenSSH 9.8+: the per-connection process
    "sshd-auth": SSHD_PARSERS,  # OpenSSH 10+: the pre-authentication process
    "sudo": [_sudo, _pam],
    "su": [_su, _pam],
    "systemd-logind": [_logind],
}
SEVERITY = {
    Auth.SSH_FAILED: events_pb2.SEVERITY_NOTICE,
    Auth.SSH_INVALID_USER: events_pb2.SEVERITY_NOTICE,
    Auth.SUDO_FAILED: events_pb2.SEVERITY_WARNING,
    Auth.USER_ADDED: events_pb2.SEVERITY_NOTICE,
    Auth.USER_DELETED: events_pb2.SEVERITY_NOTICE,
    Auth.USER_MODIFIED: events_pb2.SEVERITY_NOTICE,
    Auth.GROUP_ADDED: events_pb2.SEVERITY_NOTICE,
    Auth.GROUP_DELETED: events_pb2.SEVERITY_NOTICE,
    Auth.PASSWORD_CHANGED: events_pb2.SEVERITY_NOTICE,
}


def parse_message(program: str, pid: int, message: str, raw: str, ts_ns: int = 0) -> ParsedLine | None:
    """An AuthEvent for a message from `program`, or None when it is not an auth event we know."""
    repeats = 1
    if match := REPEATED.match(message):
        repeats, message = int(match.group("count")), match.group("message")
    message = message.rstrip()
    auth = events_pb2.AuthEvent(program=program, pid=pid, raw=raw[:4096])
    for parser in PARSERS.get(program, [_account, _pam]):
        failures = parser(message, auth)
        if failures is None:
            continue
        severity = SEVERITY.get(auth.kind, events_pb2.SEVERITY_INFO)
        if auth.kind == Auth.SU and auth.method == "failed":
            severity = events_pb2.SEVERITY_WARNING
        return ParsedLine(auth, severity, ts_ns, max(repeats, 1), failures)
    return None


def parse_line(line: str, now_ns: int | None = None) -> ParsedLine | None:
    """A log file line (its line end, LF or CRLF, dropped); `now_ns` dates yearless timestamps."""
    text = line.rstrip("\r\n")
    match = RFC5424.match(text) or TRADITIONAL.match(text)
    if not match:
        return None
    fields = match.groupdict()
    ts_ns = line_time_ns(fields, time.time_ns() if now_ns is None else now_ns)
    pid = int(fields["pid"]) if (fields["pid"] or "").isdigit() else 0
    return parse_message(fields["program"], pid, fields["message"] or "", text, ts_ns)
