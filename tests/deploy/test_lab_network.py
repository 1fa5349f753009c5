"""scripts/nspawn's network set-up and tear-down leave the host as found (what `make lab-down` relies on).

Each case runs the real scripts in a fresh network and mount namespace (its own ip_forward, nftables,
links and /run/amoskys-nspawn), so the machine's own lab or Molecule runs are not touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NSPAWN = Path(__file__).resolve().parents[2] / "scripts" / "nspawn"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "ip", "nft", "sysctl")),
    reason="needs root, unshare, ip, nft",
)


def in_fresh_namespaces(script: str, forward_before: int) -> str:
    """Run `script` (bash, scripts/nspawn as $N) with ip_forward set to `forward_before`; its output."""
    prologue = (
        "set -euo pipefail; mount -t tmpfs tmpfs /run; "
        f"sysctl -qw net.ipv4.ip_forward={forward_before}; N={NSPAWN}; "
        'state() { echo "forward=$(sysctl -n net.ipv4.ip_forward)'
        " table=$(nft list tables | grep -c amoskys_nat || true)"
        ' bridges=$(ip -br link show type bridge | wc -l)"; }; '
    )
    result = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c",
                             prologue + script], capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("forward_before", [0, 1])
def test_down_restores_ip_forward_and_removes_bridge_and_nat(forward_before: int) -> None:
    out = in_fresh_namespaces(
        "$N/bridge-up.sh br-amx-t1 10.231.41.1/24; $N/nat-up.sh 10.231.41.0/24; state; "
        "$N/bridge-up.sh br-amx-t2 10.231.42.1/24; $N/nat-up.sh 10.231.42.0/24; "
        "$N/net-down.sh br-amx-t1 10.231.41.0/24; state; "
        "$N/net-down.sh br-amx-t2 10.231.42.0/24; state",
        forward_before,
    )
    up, one_left, down = out.split()[0:3], out.split()[3:6], out.split()[6:9]
    assert up == ["forward=1", "table=1", "bridges=1"]
    assert one_left == ["forward=1", "table=1", "bridges=1"]  # the other subnet still needs NAT
    assert down == [f"forward={forward_before}", "table=0", "bridges=0"]


def test_nat_up_twice_keeps_the_first_recorded_value() -> None:
    """A second `make lab` (nat-up again while up) must not record the 1 the first one set."""
    out = in_fresh_namespaces(
        "$N/nat-up.sh 10.231.43.0/24; $N/nat-up.sh 10.231.43.0/24; $N/net-down.sh br-none 10.231.43.0/24; state",
        0,
    )
    assert out.split() == ["forward=0", "table=0", "bridges=0"]
