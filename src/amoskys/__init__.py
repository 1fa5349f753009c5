"""AMOSKYS: security telemetry for Linux fleets."""

__all__ = ["__version__"]

__version__ = "0.1.0"
