"""The permission rule for private key files, shared by every component (no crypto library needed)."""

from __future__ import annotations

import stat
from pathlib import Path

from amoskys.errors import IdentityError

__all__ = ["PRIVATE_MODE", "check_private_permissions"]

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
