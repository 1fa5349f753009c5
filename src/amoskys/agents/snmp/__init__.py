"""snmp: the poller agent (agent.py) and its trap receiver (traps.py)."""
