"""Vendor names for MAC addresses from the IEEE MA-L registry (Debian's ieee-data `oui.txt`).

The registry (5 MB, 32,000 entries) is not held in memory: each lookup of prefixes not seen
before reads the file once, and only the names found (or not found) are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from amoskys.errors import ConfigError

__all__ = ["OuiRegistry"]

log = logging.getLogger(__name__)

MARKER = b"(base 16)"
MAX_CACHED = 4096


def oui_of(mac: str) -> str:
    """The 24-bit prefix of `aa:bb:cc:dd:ee:ff` as the registry writes it (AABBCC); '' for a
    locally administered or multicast address, which no vendor owns."""
    first = int(mac[:2], 16)
    if first & 0x03:
        return ""
    return mac[:8].replace(":", "").upper()


class OuiRegistry:
    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self.cache: dict[str, str] = {}

    def check(self) -> None:
        """Refuse a configured registry that cannot be read (at start, not at the first device)."""
        if self.path is None:
            return
        try:
            with self.path.open("rb") as handle:
                head = handle.read(1 << 16)
        except OSError as exc:
            raise ConfigError(
                f"scanner.oui_file: {self.path}: cannot be read: {exc.strerror} "
                "(install ieee-data, or set oui_file: '' to report no vendor names)"
            ) from exc
        if MARKER not in head:
            raise ConfigError(f"scanner.oui_file: {self.path}: not an IEEE oui.txt (no '(base 16)' lines)")

    def vendors(self, macs: Iterable[str]) -> dict[str, str]:
        """Each MAC's vendor ('' when unknown), reading the registry at most once."""
        prefixes = {mac: oui_of(mac) for mac in macs}
        wanted = {p for p in prefixes.values() if p and p not in self.cache}
        if wanted and self.path is not None:
            try:
                found = self._read(self.path, wanted)
            except OSError as exc:  # e.g. replaced by a package upgrade just now: try again next time
                log.warning("cannot read the OUI registry", extra={"path": str(self.path), "error": str(exc)})
            else:
                if len(self.cache) + len(wanted) > MAX_CACHED:
                    self.cache.clear()
                self.cache.update({prefix: found.get(prefix, "") for prefix in wanted})
        return {mac: self.cache.get(prefix, "") for mac, prefix in prefixes.items()}

    @staticmethod
    def _read(path: Path, wanted: set[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        keys = {prefix.encode() for prefix in wanted}
        with path.open("rb") as handle:
            for line in handle:
                if line[:6] in keys and MARKER in line:
                    found[line[:6].decode()] = line.split(MARKER, 1)[1].strip().decode("utf-8", "replace")
                    if len(found) == len(keys):
                        break
        return found
