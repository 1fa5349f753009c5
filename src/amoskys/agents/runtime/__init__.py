"""The one agent runtime: identity, outbox, batching, publishing, heartbeat, metrics and signals (runner.py)."""
