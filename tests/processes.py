"""Stopping the real peers tests start (snmpd, Chromium): politely first, then for sure."""

from __future__ import annotations

import subprocess

__all__ = ["stop_process"]


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to `timeout` seconds, then SIGKILL; always reaped."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
