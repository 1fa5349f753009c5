"""auth's parser: one line per recognised format (README, auth table), the log's own time, real captured lines."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amoskys.agents.auth.lines import Failures, bsd_time_ns, parse_line
from amoskys.v1 import events_pb2

Kind = events_pb2.AuthEvent.Kind
DATA = Path(__file__).parent / "data" / "auth"
H = "2026-11-22T10:15:01.123456+00:00 web1"  # rsyslog's default file format (RFC 3339, microseconds)
B = "Nov 22 10:15:03 web1"  # RFC 3164, as rsyslog's traditional file format writes it
A = "198.51.100.9"
CORPUS: list[tuple[str, int | None, dict[str, object]]] = [
    # sshd (auth2.c auth_log: "%s %s%s%s for %s%.100s from %.200s port %d ssh2%s%s"), every method
    (f"{H} sshd[1201]: Accepted publickey for alice from 203.0.113.7 port 50122 ssh2: ED25519 SHA256:abc",
     Kind.SSH_ACCEPTED, {"user": "alice", "src_ip": "203.0.113.7", "src_port": 50122, "method": "publickey"}),
    (f"{B} sshd[1201]: Accepted publickey for alice from 203.0.113.7 port 50122 ssh2",
     Kind.SSH_ACCEPTED, {"user": "alice", "method": "publickey"}),  # 5.x: no key in the line
    (f"{H} sshd[1201]: Accepted password for alice from 2001:db8::7 port 50122 ssh2",
     Kind.SSH_ACCEPTED, {"src_ip": "2001:db8::7", "method": "password"}),
    (f"{H} sshd[1201]: Accepted keyboard-interactive/pam for alice from {A} port 50122 ssh2",
     Kind.SSH_ACCEPTED, {"method": "keyboard-interactive/pam"}),
    (f"{H} sshd[1201]: Accepted hostbased for alice from {A} port 50122 ssh2: ECDSA SHA256:xyz",
     Kind.SSH_ACCEPTED, {"method": "hostbased"}),
    (f"{H} sshd[1201]: Accepted gssapi-with-mic for alice from {A} port 50122 ssh2",
     Kind.SSH_ACCEPTED, {"method": "gssapi-with-mic", "user": "alice"}),
    (f"{H} sshd-session[1201]: Accepted publickey for alice from {A} port 50122 ssh2: ED25519 SHA256:abc",
     Kind.SSH_ACCEPTED, {"program": "sshd-session"}),  # OpenSSH 9.8+
    (f"{H} sshd[1202]: Failed password for root from {A} port 40022 ssh2",
     Kind.SSH_FAILED, {"user": "root", "src_ip": A, "method": "password"}),
    (f"{H} sshd[1203]: Failed password for invalid user admin from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"user": "admin", "src_ip": A, "src_port": 40024}),
    (f"{H} sshd[1203]: Failed none for invalid user admin from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"user": "admin", "method": "none"}),
    (f"{H} sshd[1203]: Failed publickey for root from {A} port 40024 ssh2: RSA SHA256:Zm9v",
     Kind.SSH_FAILED, {"user": "root", "method": "publickey"}),
    (f"{H} sshd[1203]: Failed keyboard-interactive/pam for invalid user x from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"user": "x", "method": "keyboard-interactive/pam"}),
    (f"{H} sshd[1203]: Failed gssapi-with-mic for alice from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"method": "gssapi-with-mic"}),
    (f"{H} sshd[1203]: Failed hostbased for alice from {A} port 40024 ssh2: ECDSA SHA256:xyz",
     Kind.SSH_FAILED, {"method": "hostbased"}),
    (f"{B} sshd[1203]: Failed password for invalid user no such user from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"user": "no such user", "src_ip": A}),
    (f"{B} sshd[1203]: Failed password for illegal user oracle from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"user": "oracle"}),  # OpenSSH 3.x/4.x
    (f"{B} sshd[1203]: Failed password for invalid user x from 6.6.6.6 port 1 ssh2 from {A} port 40024 ssh2",
     Kind.SSH_FAILED, {"user": "x from 6.6.6.6 port 1 ssh2", "src_ip": A}),  # a user cannot forge the address
    # invalid and refused users (auth.c getpwnamallow, allowed_user)
    (f"{H} sshd[1203]: Invalid user admin from {A} port 40024",
     Kind.SSH_INVALID_USER, {"user": "admin", "src_ip": A, "src_port": 40024}),
    (f"{B} sshd[24200]: Invalid user webmaster from 173.234.31.186",
     Kind.SSH_INVALID_USER, {"user": "webmaster", "src_ip": "173.234.31.186", "src_port": 0}),  # before 7.x
    (f"{B} sshd[1203]: Invalid user  from {A} port 40024", Kind.SSH_INVALID_USER, {"user": ""}),
    (f"{B} sshd[1203]: Illegal user test from {A}", Kind.SSH_INVALID_USER, {"user": "test"}),
    (f"{B} sshd[1203]: User root from {A} not allowed because not listed in AllowUsers",
     Kind.SSH_INVALID_USER, {"user": "root", "method": "not listed in AllowUsers"}),
    (f"{B} sshd[1203]: User bob from host.example not allowed because account is locked",
     Kind.SSH_INVALID_USER, {"user": "bob", "src_ip": ""}),  # UseDNS: a host name is not an address
    # the connection ended before authentication (packet.c sshpkt_vfatal, with the auth2.c preamble)
    (f"{H} sshd[1203]: Connection closed by authenticating user root {A} port 40024 [preauth]",
     Kind.SSH_FAILED, {"user": "root", "src_ip": A, "src_port": 40024, "method": "closed"}),
    (f"{H} sshd[1203]: Connection closed by invalid user no such user {A} port 40024 [preauth]",
     Kind.SSH_FAILED, {"user": "no such user", "method": "closed"}),
    (f"{H} sshd[1203]: Disconnected from authenticating user root {A} port 40024 [preauth]",
     Kind.SSH_FAILED, {"user": "root", "method": "disconnected"}),
    (f"{H} sshd[1203]: Disconnected from invalid user x {A} port 40024 [preauth]",
     Kind.SSH_FAILED, {"user": "x", "method": "disconnected"}),
    (f"{H} sshd[1203]: Connection reset by authenticating user root {A} port 40024 [preauth]",
     Kind.SSH_FAILED, {"method": "reset"}),
    (f"{H} sshd[1203]: error: maximum authentication attempts exceeded for root from {A} port 40024 ssh2 [preauth]",
     Kind.SSH_FAILED, {"user": "root", "src_ip": A, "method": "max-attempts"}),
    (f"{H} sshd[1203]: error: maximum authentication attempts exceeded for invalid user x from {A} port 1 ssh2"
     " [preauth]", Kind.SSH_FAILED, {"user": "x", "method": "max-attempts"}),
    (f"{H} sshd[1203]: Disconnecting invalid user x {A} port 40024: Too many authentication failures [preauth]",
     Kind.SSH_FAILED, {"user": "x", "src_ip": A, "method": "too-many"}),
    (f"{B} sshd[1203]: Disconnecting: Too many authentication failures for root [preauth]",
     Kind.SSH_FAILED, {"user": "root", "src_ip": "", "method": "too-many"}),  # 6.x: no address
    (f"{B} sshd[1203]: PAM 2 more authentication failures; logname= uid=0 euid=0 tty=ssh ruser= rhost={A}  user=root",
     Kind.SSH_FAILED, {"user": "root", "src_ip": A, "method": "pam"}),
    (f"{B} sshd[1203]: PAM 1 more authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost={A}",
     Kind.SSH_FAILED, {"user": "", "src_ip": A, "method": "pam"}),
    (f"{B} sshd[1203]: error: PAM: Authentication failure for illegal user x from {A}",
     Kind.SSH_FAILED, {"user": "x", "method": "pam"}),
    (f"{B} sshd[1203]: ROOT LOGIN REFUSED FROM {A} port 40024",
     Kind.SSH_FAILED, {"user": "root", "src_ip": A, "method": "root-refused"}),
    # known and left out: no outcome, or the same fact as a mapped line
    (f"{H} sshd[1201]: Received disconnect from {A} port 50122:11: disconnected by user", None, {}),
    (f"{H} sshd[1201]: Disconnected from user alice {A} port 50122", None, {}),
    (f"{H} sshd[1201]: Connection closed by {A} port 50122 [preauth]", None, {}),
    (f"{H} sshd[1201]: Postponed keyboard-interactive for alice from {A} port 50122 ssh2 [preauth]", None, {}),
    (f"{H} sshd[1201]: Partial publickey for alice from {A} port 50122 ssh2: ED25519 SHA256:abc", None, {}),
    (f"{B} sshd[1201]: input_userauth_request: invalid user webmaster [preauth]", None, {}),
    (f"{B} sshd[1201]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost={A}",
     None, {}),
    # sudo (plugins/sudoers/logging.c)
    (f"{B} sudo:    alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/apt update",
     Kind.SUDO, {"user": "alice", "target_user": "root", "tty": "pts/0", "command": "/usr/bin/apt update"}),
    (f"{H} sudo:    alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; GROUP=adm ; TSID=000001 ; COMMAND=/bin/id",
     Kind.SUDO, {"command": "/bin/id"}),
    (f"{H} sudo:      bob : 3 incorrect password attempts ; TTY=pts/1 ; PWD=/home/bob ; USER=root ; COMMAND=/bin/sh",
     Kind.SUDO_FAILED, {"user": "bob", "command": "/bin/sh", "method": "3 incorrect password attempts"}),
    (f"{H} sudo:      bob : 1 incorrect password attempt ; TTY=pts/1 ; PWD=/home/bob ; USER=root ; COMMAND=/bin/sh",
     Kind.SUDO_FAILED, {"method": "1 incorrect password attempt"}),
    (f"{H} sudo:      eve : user NOT in sudoers ; TTY=pts/2 ; PWD=/tmp ; USER=root ; COMMAND=/usr/bin/id",
     Kind.SUDO_FAILED, {"user": "eve", "method": "user NOT in sudoers"}),
    (f"{H} sudo:      eve : command not allowed ; TTY=pts/2 ; PWD=/tmp ; USER=root ; COMMAND=/bin/bash",
     Kind.SUDO_FAILED, {"method": "command not allowed"}),
    (f"{B} sudo[1600]: pam_unix(sudo:auth): authentication failure; logname=bob uid=1001 euid=0 tty=/dev/pts/1"
     " ruser=bob rhost=  user=bob", Kind.SUDO_FAILED, {"user": "bob", "method": "pam: authentication failure"}),
    (f"{B} sudo[1600]: pam_unix(sudo:session): session opened for user root(uid=0) by alice(uid=1000)",
     Kind.SESSION_OPENED, {"user": "root", "method": "sudo"}),
    # su: util-linux (Debian 10+), then shadow's (older)
    (f"{H} su[1300]: (to root) alice on pts/0", Kind.SU, {"user": "alice", "target_user": "root", "tty": "pts/0"}),
    (f"{H} su[1300]: FAILED SU (to root) alice on pts/0",
     Kind.SU, {"user": "alice", "target_user": "root", "method": "failed"}),
    (f"{B} su[1300]: Successful su for root by alice", Kind.SU, {"user": "alice", "target_user": "root", "method": ""}),
    (f"{B} su[1300]: FAILED su for root by alice", Kind.SU, {"user": "alice", "method": "failed"}),
    (f"{B} su[1300]: pam_unix(su:auth): authentication failure; logname=alice uid=1000 euid=0 tty=/dev/pts/0"
     " ruser=alice rhost=  user=root", Kind.SU, {"user": "alice", "target_user": "root", "method": "failed"}),
    (f"{B} su[1300]: pam_unix(su-l:session): session opened for user root(uid=0) by alice(uid=1000)",
     Kind.SESSION_OPENED, {"user": "root", "method": "su-l"}),
    # shadow's tools
    (f"{H} useradd[1400]: new group: name=carol, GID=1003", Kind.GROUP_ADDED, {"group": "carol"}),
    (f"{H} useradd[1400]: new user: name=carol, UID=1003, GID=1003, home=/home/carol, shell=/bin/bash, from=/dev/pts/0",
     Kind.USER_ADDED, {"user": "carol"}),
    (f"{H} groupadd[1400]: group added to /etc/group: name=devs, GID=1005", None, {}),
    (f"{H} usermod[1401]: add 'carol' to group 'sudo'", Kind.USER_MODIFIED, {"user": "carol", "group": "sudo"}),
    (f"{H} usermod[1401]: add 'carol' to shadow group 'sudo'", Kind.USER_MODIFIED, {"group": "sudo"}),
    (f"{H} usermod[1401]: change user 'carol' shell from '/bin/bash' to '/bin/sh'",
     Kind.USER_MODIFIED, {"user": "carol"}),
    (f"{H} usermod[1401]: lock user 'carol' password", Kind.USER_MODIFIED, {"user": "carol"}),
    (f"{H} usermod[1401]: change user name 'carol' to 'caroline'", Kind.USER_MODIFIED, {"user": "caroline"}),
    (f"{H} gpasswd[1401]: user carol added by root to group devs",
     Kind.USER_MODIFIED, {"user": "carol", "group": "devs"}),
    (f"{H} passwd[1402]: pam_unix(passwd:chauthtok): password changed for carol",
     Kind.PASSWORD_CHANGED, {"user": "carol"}),
    (f"{H} chpasswd[1402]: pam_unix(chpasswd:chauthtok): password changed for carol", Kind.PASSWORD_CHANGED, {}),
    (f"{H} passwd[1402]: password for 'carol' changed by 'root'", Kind.PASSWORD_CHANGED, {"user": "carol"}),
    (f"{H} chage[1402]: changed password expiry for carol", Kind.USER_MODIFIED, {"user": "carol"}),
    (f"{H} userdel[1403]: delete user 'carol'", Kind.USER_DELETED, {"user": "carol"}),
    (f"{H} userdel[1403]: delete 'carol' from group 'sudo'", Kind.USER_MODIFIED, {"user": "carol", "group": "sudo"}),
    (f"{H} userdel[1403]: removed group 'carol' owned by 'carol'", Kind.GROUP_DELETED, {"group": "carol"}),
    (f"{H} groupdel[1404]: group 'carol' removed", Kind.GROUP_DELETED, {"group": "carol"}),
    (f"{H} groupdel[1404]: group 'carol' removed from /etc/group", None, {}),
    # sessions: PAM and systemd-logind
    (f"{H} sshd[1201]: pam_unix(sshd:session): session opened for user alice(uid=1000) by (uid=0)",
     Kind.SESSION_OPENED, {"user": "alice", "method": "sshd"}),
    (f"{H} sshd[1201]: pam_unix(sshd:session): session closed for user alice", Kind.SESSION_CLOSED, {"user": "alice"}),
    (f"{H} CRON[1500]: pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)",
     Kind.SESSION_OPENED, {"user": "root", "method": "cron"}),
    (f"{H} systemd-logind[400]: New session 12 of user alice.",
     Kind.SESSION_OPENED, {"user": "alice", "method": "logind", "tty": "session 12"}),
    (f"{H} systemd-logind[400]: Removed session 12.", Kind.SESSION_CLOSED, {"user": "", "tty": "session 12"}),
    (f"{H} systemd-logind[400]: New seat seat0.", None, {}),
    # RFC 5424 framing (rsyslog's RSYSLOG_SyslogProtocol23Format), structured data and BOM included
    (f"<38>1 2026-11-22T10:15:01.123456Z web1 sshd 1201 - [meta sequenceId=\"1\"] \ufeffFailed password for root"
     f" from {A} port 40022 ssh2", Kind.SSH_FAILED, {"user": "root", "pid": 1201}),
    ("<86>1 2026-11-22T10:15:01Z web1 su - - - (to root) alice on pts/0", Kind.SU, {"pid": 0}),
]  # fmt: skip


@pytest.mark.parametrize(("line", "kind", "fields"), CORPUS, ids=[f"line{i}" for i in range(len(CORPUS))])
def test_corpus_line(line: str, kind: int | None, fields: dict[str, object]) -> None:
    parsed = parse_line(line + "\r\n")  # CRLF line ends do not reach raw
    if kind is None:
        assert parsed is None
        return
    assert parsed is not None
    assert parsed.auth.kind == kind
    for name, value in fields.items():
        assert getattr(parsed.auth, name) == value, name
    assert parsed.auth.raw == line
    assert parsed.ts_ns > 0


def lines_of(name: str) -> Iterator[str]:
    yield from (DATA / name).read_text().splitlines()


def test_real_openssh_lines() -> None:
    now = int(dt.datetime(2026, 12, 1).timestamp() * 1e9)
    kinds = [(p.auth.kind, p.auth.user, p.failures) if (p := parse_line(line, now)) else None
             for line in lines_of("openssh-9.2-loopback.log")]  # fmt: skip
    one, closed = Failures(new=1), Failures(at_least=1)
    assert kinds == [
        (Kind.SSH_FAILED, "sshtest", one), (Kind.SSH_FAILED, "sshtest", closed),
        (Kind.SSH_INVALID_USER, "no such user", closed), (Kind.SSH_FAILED, "no such user", one),
        (Kind.SSH_FAILED, "no such user", closed),
        (Kind.SSH_INVALID_USER, "nobodyhere", closed), (Kind.SSH_FAILED, "nobodyhere", one),
        (Kind.SSH_FAILED, "nobodyhere", closed),
        (Kind.SSH_FAILED, "sshtest", closed), None, (Kind.SSH_FAILED, "sshtest", closed),  # PAM, Postponed, closed
        (Kind.SSH_FAILED, "sshtest", closed),  # a key-only probe: this line is all there is
        (Kind.SSH_INVALID_USER, "ghost", closed), (Kind.SSH_FAILED, "ghost", closed),
        (Kind.SSH_ACCEPTED, "sshtest", Failures()), None, None, None,
        (Kind.SSH_FAILED, "sshtest", closed),  # a key-only probe again
        (Kind.SSH_FAILED, "sshtest", closed), (Kind.SSH_FAILED, "sshtest", closed),  # too many attempts: 2 lines
    ]  # fmt: skip


def test_real_shadow_and_su_lines() -> None:
    parsed = [parse_line(line) for line in lines_of("shadow-4.13-util-linux-su.log")]
    assert [(p.auth.kind, p.auth.user, p.auth.group) for p in parsed if p] == [
        (Kind.GROUP_ADDED, "", "devs"), (Kind.USER_ADDED, "carol", ""),
        (Kind.USER_MODIFIED, "carol", "devs"), (Kind.USER_MODIFIED, "carol", "devs"), (Kind.USER_MODIFIED, "carol", ""),
        (Kind.USER_DELETED, "carol", ""), (Kind.USER_MODIFIED, "carol", "devs"), (Kind.USER_MODIFIED, "carol", "devs"),
        (Kind.GROUP_DELETED, "", "devs"), (Kind.SU, "root", ""),
        (Kind.SESSION_OPENED, "nobody", ""), (Kind.SESSION_CLOSED, "nobody", ""),
    ]  # fmt: skip


def test_message_repeated_stands_for_each_repetition() -> None:
    line = f"{B} sshd[1202]: message repeated 3 times: [ Failed password for root from {A} port 40022 ssh2]"
    parsed = parse_line(line)
    assert parsed is not None
    assert (parsed.repeats, parsed.auth.kind, parsed.auth.user, parsed.auth.src_ip) == (3, Kind.SSH_FAILED, "root", A)
    assert parsed.auth.raw == line


# ---- the log's own time ------------------------------------------------------------------------------


def local_ns(*fields: int) -> int:
    return int(dt.datetime(*fields).timestamp()) * 1_000_000_000  # type: ignore[misc]


@pytest.fixture(params=["UTC", "America/New_York", "Australia/Lord_Howe"])
def local_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Yearless times are local: check them in zones with and without DST (Lord Howe shifts 30 min)."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_rfc3339_with_zone_and_microseconds() -> None:
    parsed = parse_line(f"2026-11-22T10:15:01.123456+02:00 web1 sshd[1]: Failed password for root from {A} port 1 ssh2")
    assert parsed is not None
    assert parsed.ts_ns == 1_795_335_301_123_456_000  # 08:15:01.123456 UTC


@pytest.mark.usefixtures("local_zone")
def test_rfc3339_without_zone_is_local_time() -> None:
    parsed = parse_line("2026-11-22T10:15:01 web1 su[1]: (to root) alice on pts/0")
    assert parsed is not None
    assert parsed.ts_ns == local_ns(2026, 11, 22, 10, 15, 1)


@pytest.mark.usefixtures("local_zone")
@pytest.mark.parametrize(
    ("stamp", "now", "expected"),
    [
        ("Nov 22 10:15:03", (2026, 11, 30, 12, 0, 0), (2026, 11, 22, 10, 15, 3)),
        ("Dec 31 23:59:59", (2027, 1, 1, 0, 0, 10), (2026, 12, 31, 23, 59, 59)),  # read just after New Year
        ("Jan  1 00:00:05", (2026, 12, 31, 23, 59, 58), (2027, 1, 1, 0, 0, 5)),  # seconds ahead, across New Year
        ("Jan  1 00:00:05", (2026, 12, 30, 12, 0, 0), (2026, 1, 1, 0, 0, 5)),  # a day and more ahead: last year's
        ("Dec  1 08:00:00", (2026, 11, 29, 12, 0, 0), (2025, 12, 1, 8, 0, 0)),  # never a day ahead of the clock
        ("Dec  1 08:00:00", (2026, 11, 30, 12, 0, 0), (2026, 12, 1, 8, 0, 0)),  # a writer in another zone: hours
        ("Nov 30 12:30:00", (2026, 11, 30, 12, 0, 0), (2026, 11, 30, 12, 30, 0)),  # a clock behind: small skew kept
        ("Feb 29 06:00:00", (2027, 3, 1, 0, 0, 0), (2024, 2, 29, 6, 0, 0)),  # back to the last leap year
    ],
)
def test_rfc3164_year_is_inferred(stamp: str, now: tuple[int, ...], expected: tuple[int, ...]) -> None:
    parsed = parse_line(f"{stamp} web1 su[1]: (to root) alice on pts/0", local_ns(*now))
    assert parsed is not None
    assert parsed.ts_ns == local_ns(*expected)


def test_unreadable_time_keeps_the_event_and_says_so() -> None:
    parsed = parse_line("Feb 30 10:00:00 web1 su[1]: (to root) alice on pts/0")
    assert parsed is not None and parsed.auth.kind == Kind.SU
    assert parsed.ts_ns == 0  # the agent stamps it on arrival
    with pytest.raises(ValueError, match="Feb 30 10:00:00 is not a date"):
        bsd_time_ns("Feb", 30, "10:00:00", time.time_ns())
    assert parse_line("2026-13-45T99:00:00Z web1 su[1]: (to root) alice on pts/0").ts_ns == 0  # type: ignore[union-attr]
