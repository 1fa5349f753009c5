"""What the words mean wherever they are shown or typed (`amoskys status`/`query` and the UI alike):
an agent's liveness.
"""

from __future__ import annotations

from amoskys.v1 import bus_pb2

__all__ = ["DEFAULT_INTERVAL_S", "LATE_FACTOR", "STATES", "liveness"]

LATE_FACTOR = 2.5  # missed heartbeat intervals before an agent is late; twice that: down
DEFAULT_INTERVAL_S = 30  # an agent that never said its heartbeat interval
STATES = ("up", "late", "down")  # best first


def liveness(agent: bus_pb2.AgentInfo, now_ns: int) -> str:
    """up / late / down: the age of the agent's last heartbeat (its last envelope if it never sent one)
    against its own heartbeat interval; late after LATE_FACTOR intervals, down after twice that."""
    interval_s = agent.heartbeat_interval_s or DEFAULT_INTERVAL_S
    age_s = (now_ns - (agent.last_heartbeat_ns or agent.last_seen_ns)) / 1e9
    if age_s <= interval_s * LATE_FACTOR:
        return "up"
    return "late" if age_s <= interval_s * 2 * LATE_FACTOR else "down"
