"""Subcommands of `amoskys`, one module each, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, TypeAlias

__all__ = ["Subparsers"]

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers: TypeAlias = Any
