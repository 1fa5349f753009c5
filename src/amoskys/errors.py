"""The errors AMOSKYS raises on purpose: each carries a message fit for an operator."""

from __future__ import annotations

__all__ = ["AmoskysError", "ConfigError", "IdentityError", "VerificationError"]


class AmoskysError(Exception):
    """Base of every deliberate refusal; the CLI prints it and exits 2."""


class ConfigError(AmoskysError):
    """A configuration file or override is unreadable or invalid."""


class IdentityError(AmoskysError):
    """A key or certificate is missing, unsafe, mismatched, expired or untrusted."""


class VerificationError(AmoskysError):
    """An envelope failed signature or structure verification."""
