"""Reading identity files with clear errors, the permission rule for private keys, and the name rule.

Shared by every component; needs no crypto library (agents load no X.509 code).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from amoskys.errors import IdentityError

__all__ = [
    "IDENTITY_NAME",
    "IDENTITY_RULE",
    "PRIVATE_MODE",
    "check_identity_name",
    "check_private_permissions",
    "read_identity_file",
    "read_private_key",
]

PRIVATE_MODE = 0o600
MAX_IDENTITY_BYTES = 16 << 20  # a CRL of some 300,000 serials; certificates, CSRs and keys are a few KiB
# An agent id, consumer or host identity is a certificate's common name and a file name (NAME.key, NAME.pub):
# at most 64 characters (X.509 ub-common-name, RFC 5280), no '/', never '.' or '..' (it starts alphanumeric).
IDENTITY_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
IDENTITY_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_identity_name(name: str, what: str) -> str:
    """Return `name` if it is a valid identity (agent id / common name); `what` names it in the error."""
    if not re.fullmatch(IDENTITY_NAME, name):
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"
        raise IdentityError(f"{what} {shown} is not a valid identity: expected {IDENTITY_RULE}")
    return name


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


def _read_bounded(path: Path, what: str) -> bytes:
    """At most MAX_IDENTITY_BYTES: /dev/zero or a log file given by mistake is refused, not read whole."""
    with path.open("rb") as handle:
        data = handle.read(MAX_IDENTITY_BYTES + 1)
    if len(data) > MAX_IDENTITY_BYTES:
        raise IdentityError(f"{path}: larger than {MAX_IDENTITY_BYTES // (1 << 20)} MiB; not a {what}")
    return data


def read_private_key(path: Path) -> bytes:
    """A private key file's bytes, after the permission check."""
    check_private_permissions(path)
    try:
        return _read_bounded(path, "private key")
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read private key: {exc.strerror}") from exc


def read_identity_file(path: Path, what: str) -> bytes:
    """A certificate's (or CA certificate's, CSR's, CRL's) bytes; `what` names it in the error."""
    try:
        return _read_bounded(path, what)
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: {what} not found") from exc
    except PermissionError as exc:
        raise IdentityError(f"{path}: {what} not readable by this user") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read {what}: {exc.strerror}") from exc
