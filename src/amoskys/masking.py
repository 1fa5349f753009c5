"""Secret masking for logs and config dumps: one rule for which keys hold secrets."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SECRET_KEYS", "mask_secrets"]

SECRET_KEYS = re.compile(r"(password|passwd|secret|token|community|communities|auth_key|priv_key|_hash)$", re.I)


def mask_secrets(value: Any) -> Any:
    """Replace the values of secret-looking keys, recursively (for logs and dumps)."""
    if isinstance(value, dict):
        return {k: ("***" if SECRET_KEYS.search(str(k)) and v else mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value
