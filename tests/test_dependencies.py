"""What every host installs: test-only packages stay in the test extra and out of the code."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

TEST_ONLY = {"scapy"}


def test_test_only_packages_are_only_in_the_test_extra() -> None:
    runtime = {req.split(";")[0].split(">")[0].split("<")[0].strip() for req in metadata.requires("amoskys") or []
               if "extra ==" not in req}  # fmt: skip
    assert not runtime & TEST_ONLY


def test_no_module_of_amoskys_imports_a_test_only_package() -> None:
    probe = (
        "import importlib, pkgutil, sys\n"
        "import amoskys\n"
        "for module in pkgutil.walk_packages(amoskys.__path__, 'amoskys.'):\n"
        "    if module.name.endswith('__main__'): continue  # runs the CLI\n"
        "    importlib.import_module(module.name)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    assert "amoskys" in loaded
    assert not loaded & TEST_ONLY
