"""`amoskys ui --config FILE`: the status UI; `amoskys ui hash-password`: a hash for its config."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from amoskys.commands import Subparsers
from amoskys.config import UiConfig, load_config
from amoskys.errors import AmoskysError
from amoskys.logs import setup_logging

MIN_PASSWORD = 12


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("ui", help="serve the status UI (reads the hub over mTLS)")
    parser.add_argument("--config", type=Path, default=Path("/etc/amoskys/ui.yml"), help="YAML config file")
    parser.set_defaults(func=run)
    actions = parser.add_subparsers(dest="ui_command", metavar="ACTION")
    hasher = actions.add_parser("hash-password", help="print an auth.password_hash for a password")
    hasher.add_argument("--stdin", action="store_true", help="read the password from stdin, not the terminal")
    hasher.set_defaults(func=hash_password)


def run(args: argparse.Namespace) -> int:
    from amoskys.ui.server import serve

    config = load_config(args.config, UiConfig)
    setup_logging(config.logging)
    return serve(config, args.config)


def hash_password(args: argparse.Namespace) -> int:
    from amoskys.ui.auth import hash_password as scrypt_hash

    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise AmoskysError("the passwords differ")
    if len(password) < MIN_PASSWORD:
        raise AmoskysError(f"use at least {MIN_PASSWORD} characters")
    print(scrypt_hash(password))
    return 0
