"""Build hook: generate the protobuf/gRPC modules and their typing stubs from proto/.

Generated code is never committed; every build (wheel, editable, `make proto`) makes it anew.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "src"


def _mypy_plugin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install mypy-protobuf in the build environment")
    return found


def generate() -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--plugin=protoc-gen-mypy={_mypy_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_mypy_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        f"--mypy_out={OUT_DIR}",
        f"--mypy_grpc_out={OUT_DIR}",
        *protos,
    ]
    subprocess.run(args, check=True, cwd=PROTO_DIR)


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Runs protoc before hatchling collects the package files."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name in ("wheel", "sdist") and PROTO_DIR.exists():
            generate()


if __name__ == "__main__":
    generate()
