"""Debian's snmpd on loopback for tests and benchmarks: its own config, persistent dir and free port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.processes import stop_process

__all__ = ["COMMUNITY", "SYS_DESCR", "SYS_NAME", "V3_USERS", "Snmpd", "free_udp_port", "run_snmpd"]

COMMUNITY = "amx-ro-7f3a"
# user -> (auth protocol, auth key, priv protocol, priv key), in net-snmp's spelling
V3_USERS = {
    "amxuser": ("SHA", "auth-pass-6d21", "AES", "priv-pass-93be"),
    "amx256": ("SHA-256", "auth-pass-256x", "AES-256", "priv-pass-256y"),
}
SYS_NAME, SYS_DESCR = "amx-test-device", "AMOSKYS test snmpd"
SYS_NAME_OID = "1.3.6.1.2.1.1.5.0"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Snmpd:
    port: int
    root: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """net-snmp tools reading nothing from /etc or the home directory, and no MIB files."""
        (self.root / "client").mkdir(parents=True, exist_ok=True)
        client = str(self.root / "client")
        return {**os.environ, "SNMPCONFPATH": client, "SNMP_PERSISTENT_DIR": client, "MIBS": ""}

    def snmpget(self, *oids: str, user: str = "", community: str = COMMUNITY) -> list[str]:
        """Values as net-snmp prints them (-Oqv), strings unquoted; v2c, or v3 authPriv as `user`."""
        out = self._run("snmpget", "-Oqv", *oids, user=user, community=community)
        return [line.strip().strip('"') for line in out.splitlines()]

    def snmpwalk(self, oid: str, community: str = COMMUNITY) -> dict[int, str]:
        """A table column as net-snmp walks it (v2c): {last index: value as printed, unquoted}."""
        rows = (line.split(" ", 1) for line in self._run("snmpwalk", "-Oq", oid, community=community).splitlines())
        return {int(name.rsplit(".", 1)[1]): value.strip().strip('"') for name, value in rows if name.startswith(".")}

    def _run(self, tool: str, *args: str, user: str = "", community: str = COMMUNITY) -> str:
        if user:
            auth, auth_key, priv, priv_key = V3_USERS[user]
            security = ["-v3", "-l", "authPriv", "-u", user, "-a", auth, "-A", auth_key, "-x", priv, "-X", priv_key]
        else:
            security = ["-v2c", "-c", community]
        command = [tool, *security, "-On", "-t", "1", self.address, *args]
        return subprocess.run(command, capture_output=True, text=True, env=self.env(), check=True).stdout


def _config(root: Path, port: int, extra: str) -> str:
    users = "".join(
        f'createUser {user} {auth} "{auth_key}" {priv} "{priv_key}"\nrouser {user} priv\n'
        for user, (auth, auth_key, priv, priv_key) in V3_USERS.items()
    )
    return (
        f"[snmp] persistentDir {root / 'persist'}\n"
        f"agentaddress udp:127.0.0.1:{port},udp6:[::1]:{port}\n"
        f"rocommunity {COMMUNITY} 127.0.0.1\nrocommunity6 {COMMUNITY} ::1\n"
        f"{users}sysname {SYS_NAME}\nsysdescr {SYS_DESCR}\n{extra}"
    )


@contextlib.contextmanager
def run_snmpd(root: Path, extra: str = "") -> Iterator[Snmpd]:
    """snmpd on 127.0.0.1 and [::1] (same free port) with a v2c community and the v3 users (plus `extra`
    config lines); stopped on the way out."""
    (root / "persist").mkdir(parents=True, exist_ok=True)
    port = free_udp_port()
    config = root / "snmpd.conf"
    config.write_text(_config(root, port, extra))
    snmpd = Snmpd(port, root)
    log_path = root / "snmpd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["/usr/sbin/snmpd", "-f", "-Lo", "-C", "-c", str(config), "-p", str(root / "snmpd.pid")],
            stdout=log, stderr=subprocess.STDOUT, env={**snmpd.env(), "SNMP_PERSISTENT_DIR": str(root / "persist")},
        )  # fmt: skip
    try:
        for _ in range(50):
            with contextlib.suppress(subprocess.CalledProcessError):
                if snmpd.snmpget(SYS_NAME_OID) == [SYS_NAME]:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"snmpd exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"snmpd did not answer: {log_path.read_text()[-2000:]}")
        yield snmpd
    finally:
        stop_process(process, 5)
