"""The command line: every subcommand answers --help; the package installs into a fresh venv."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from amoskys.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


@pytest.mark.parametrize("path", command_paths(build_parser()), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*path, "--help"])
    assert caught.value.code == 0
    assert "usage: amoskys" in capsys.readouterr().out


@pytest.mark.slow
def test_fresh_venv_install_runs_pki(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)]
    subprocess.run(pip, check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    amoskys = str(env_dir / "bin" / "amoskys")
    out = subprocess.run([amoskys, "--help"], check=True, capture_output=True, text=True).stdout
    assert "pki" in out
    ca = tmp_path / "ca"
    subprocess.run([amoskys, "pki", "init-ca", "--dir", str(ca)], check=True)
    subprocess.run(
        [
            amoskys,
            "pki",
            "issue",
            "--ca-dir",
            str(ca),
            "--cn",
            "hub",
            "--usage",
            "server",
            "--dir",
            str(tmp_path / "out"),
        ],
        check=True,
    )
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca / "ca.crt"), str(tmp_path / "out" / "hub.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    generated = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "from amoskys.v1 import bus_pb2_grpc; print('ok')"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert generated.stdout.strip() == "ok"
    assert sys.executable  # the outer interpreter is untouched


def test_agent_list_is_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from amoskys.catalog import AGENT_KINDS

    assert main(["agent", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["name"] for k in listed] == sorted(AGENT_KINDS)
    assert {"process", "heartbeat", "alert"} == set(next(k for k in listed if k["name"] == "proc")["bodies"])
    assert len({k["metrics_port"] for k in listed}) == len(listed)  # each kind's own port
    assert main(["agent"]) == 2
    assert "--list" in capsys.readouterr().err
