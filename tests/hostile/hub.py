"""`amoskys eventbus` as a real process for the hostile suite: its own PKI, trust dir, CRL and store.

The child gets RLIMIT_NOFILE raised the way the unit's `LimitNOFILE=` raises it under systemd.
Identities are enrolled by writing trust files and sending SIGHUP, as an operator would.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amoskys import pki
from tests.conftest import TestPki
from tests.hostile.client import Consumer, Credentials, HostileAgent

__all__ = ["CONSUMERS", "HUB_NOFILE", "HubProcess", "new_pki"]

HUB_NOFILE = 65536  # what the hub unit's LimitNOFILE gives it (>= 10,000 agents)
CONSUMERS = ["ui", "operator", "doomed-ui"]


def new_pki(root: Path) -> TestPki:
    return TestPki(root, pki.init_ca(root / "ca", "Hostile Test CA", days=60))


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = HUB_NOFILE if hard == resource.RLIM_INFINITY else min(HUB_NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class HubProcess:
    """The hub in a child process on 127.0.0.1 (port chosen by the kernel, read from its log)."""

    def __init__(self, root: Path, test_pki: TestPki, **overrides: Any) -> None:
        self.root, self.pki = root, test_pki
        self.trust_dir = root / "trust"
        self.trust_dir.mkdir(parents=True)
        self.crl = root / "crl.pem"
        self.log = root / "hub.log"
        key, cert = test_pki.issue("hub", "server", ["localhost", "127.0.0.1"])
        document: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "tls": {"ca": str(test_pki.ca_cert), "cert": str(cert), "key": str(key)},
            "trust_map": str(self.trust_dir),
            "crl": str(self.crl),
            "consumers": CONSUMERS,
            "store": {"path": str(root / "store" / "events.db"), "prune_interval_s": 3600},
            "metrics": {"listen": ""},
            "limits": {"handshake_timeout_s": 2.0},
            "drain_timeout_s": 5,
        }
        document.update(overrides)
        self.config = root / "eventbus.yml"
        self.config.write_text(yaml.safe_dump(document))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0  # when `metrics: {listen: 127.0.0.1:0}` is among the overrides

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amoskys", "eventbus", "--config", str(self.config)],
                stderr=err,
                preexec_fn=_raise_nofile,  # noqa: PLW1509 - before exec, nothing else runs in the child
            )
        serving = self._wait_for("eventbus serving", 0)
        self.port, self.metrics_port = int(serving["port"]), int(serving.get("metrics_port") or 0)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not drain in time; always reaped."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def _wait_for(self, message: str, seen: int, timeout: float = 30) -> dict[str, Any]:
        """The first log entry `message` after the first `seen` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.entries() if e.get("msg") == message]
            if len(found) > seen:
                return found[seen]
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-4000:]
            time.sleep(0.05)
        raise AssertionError(f"no {message!r} in the hub's log: {self.log.read_text()[-4000:]}")

    def reload(self) -> dict[str, Any]:
        """SIGHUP; returns once the hub logged the new trust state."""
        assert self.proc is not None
        seen = len([e for e in self.entries() if e.get("msg") == "trust loaded"])
        self.proc.send_signal(signal.SIGHUP)
        return self._wait_for("trust loaded", seen)

    def credentials(self, cn: str) -> Credentials:
        """A client certificate for `cn` from the test CA (issued once per CN)."""
        cert_path = self.pki.root / "certs" / f"{cn}.crt"
        if not cert_path.exists():
            self.pki.issue(cn, "client")
        return Credentials(self.pki.ca_cert, cert_path, self.pki.root / "certs" / f"{cn}.key")

    def enrol(self, agent_id: str, host: str, kind: str, tls: Credentials | None = None) -> HostileAgent:
        """Write the agent's trust entry (`{key, host, kind}`); the caller reloads when the hub runs."""
        agent = HostileAgent(agent_id, host, kind, tls or self.credentials(agent_id))
        entry = {agent_id: {"key": agent.trust_line(), "host": host, "kind": kind}}
        (self.trust_dir / f"{agent_id}.yml").write_text(yaml.safe_dump(entry))
        return agent

    def consumer(self, cn: str = "ui") -> Consumer:
        return Consumer(self.credentials(cn), self.address)

    def revoke(self, tls: Credentials) -> None:
        serial = x509.load_pem_x509_certificate(tls.cert.read_bytes()).serial_number
        pki.revoke(self.pki.ca, self.crl, [serial])

    def fds(self) -> int:
        """Descriptors the hub holds open now."""
        assert self.proc is not None
        return len(list(Path(f"/proc/{self.proc.pid}/fd").iterdir()))

    def far_future_credentials(self, cn: str, not_after: dt.datetime) -> Credentials:
        """A client certificate from the test CA valid until `not_after` (past what `pki issue` allows)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.pki.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(self.pki.ca.key, hashes.SHA256())
        )
        directory = self.root / "far"
        directory.mkdir(exist_ok=True)
        cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return Credentials(self.pki.ca_cert, cert_path, key_path)
