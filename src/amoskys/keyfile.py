"""Reading identity files with clear errors, and the permission rule for private keys.

Shared by every component; needs no crypto library (agents load no X.509 code).
"""

from __future__ import annotations

import stat
from pathlib import Path

from amoskys.errors import IdentityError

__all__ = ["PRIVATE_MODE", "check_private_permissions", "read_identity_file", "read_private_key"]

PRIVATE_MODE = 0o600


def check_private_permissions(path: Path) -> None:
    """Refuse a private key that group or others can read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: private key not found") from exc
    except PermissionError as exc:
        raise IdentityError(f"{path}: private key not readable by this user") from exc
    if not stat.S_ISREG(mode):
        raise IdentityError(f"{path}: private key is not a regular file")
    if mode & 0o077:
        raise IdentityError(
            f"{path}: private key is accessible to group/others (mode {stat.S_IMODE(mode):04o}); "
            "run: chmod 600 " + str(path)
        )


def read_private_key(path: Path) -> bytes:
    """A private key file's bytes, after the permission check."""
    check_private_permissions(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read private key: {exc.strerror}") from exc


def read_identity_file(path: Path, what: str) -> bytes:
    """A certificate's (or CA certificate's) bytes; `what` names it in the error."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: {what} not found") from exc
    except PermissionError as exc:
        raise IdentityError(f"{path}: {what} not readable by this user") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read {what}: {exc.strerror}") from exc
