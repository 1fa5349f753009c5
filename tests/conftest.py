"""Shared fixtures: a throw-away PKI in a temp dir."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from amoskys import keys, pki


@dataclass(frozen=True)
class TestPki:
    __test__ = False

    root: Path
    ca: pki.CertificateAuthority

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    def issue(
        self, cn: str, usage: pki.Usage = "client", sans: list[str] | None = None, days: int = 30
    ) -> tuple[Path, Path]:
        return pki.issue(self.ca, self.root / "certs", cn, usage, sans or [], days)

    def signing_key(self, name: str) -> Path:
        path = self.root / "signing" / f"{name}.key"
        keys.write_private_key(path, keys.generate_signing_key())
        return path


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny filesystem of our own at `path`, to fill up; skips the test without root or mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    )
    if result.returncode:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def test_pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path, pki.init_ca(tmp_path / "ca", "Test CA", days=60))


from tests.hubfixture import live_hub  # noqa: E402,F401 - fixture shared by hub, agent and UI tests
