"""A short run of the envelope fuzzer (benchmarks/fuzz_envelope.py; its default run is 1,000,000 inputs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_envelope.py"


def test_fuzzed_envelopes_raise_nothing_store_no_forgery_and_leave_the_writer_alive() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(SCRIPT), "--inputs", "20000", "--seed", "11"],
        capture_output=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode()[-4000:] + result.stderr.decode()[-4000:]
    report = json.loads(result.stdout)
    assert report["inputs"] == 20000
    assert report["first_exception"] is None
    assert (report["forged_stored"], report["writer_alive"]) == (0, True)
    statuses = {outcome.split()[0] for outcome in report["outcomes"]}
    assert {"OK", "INVALID", "RETRY", "UNAUTHORIZED"} <= statuses, report["outcomes"]
    assert report["stored_events"] > 0, "no input got through: the fuzzer never reached the commit path"
