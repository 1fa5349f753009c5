"""systemd units: exposure per unit (systemd-analyze security --offline) within the thresholds."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
# The brief's ceilings: 2.0 for hub, UI, proc, host, auth, snmp; 4.5 for flow and scanner.
THRESHOLDS = {"amoskys-eventbus.service": 2.0, "amoskys-agent@proc.service": 2.0,
              "amoskys-agent@host.service": 2.0, "amoskys-agent@auth.service": 2.0}  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def instantiate(unit: str, into: Path) -> Path:
    """A template instance with its drop-ins, laid out as systemd would find them."""
    if "@" not in unit or unit.endswith("@.service"):
        shutil.copy(SYSTEMD / unit, into / unit)
        return into / unit
    template = re.sub(r"@[^.]+\.service$", "@.service", unit)
    shutil.copy(SYSTEMD / template, into / unit)
    dropins = SYSTEMD / f"{unit}.d"
    if dropins.is_dir():
        shutil.copytree(dropins, into / f"{unit}.d")
    return into / unit


@pytest.mark.parametrize(("unit", "ceiling"), sorted(THRESHOLDS.items()))
def test_exposure_within_threshold(unit: str, ceiling: float, tmp_path: Path) -> None:
    instantiate(unit, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", unit], cwd=tmp_path, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= ceiling, result.stdout


def test_every_unit_is_measured() -> None:
    units = {p.name for p in SYSTEMD.glob("*.service")}
    dropins = {p.name.removesuffix(".d") for p in SYSTEMD.glob("*.service.d")}
    assert units - {"amoskys-agent@.service"} <= set(THRESHOLDS)
    assert dropins <= set(THRESHOLDS)
