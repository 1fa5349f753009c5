"""scanner: the agent (agent.py) and MAC vendor names from the IEEE registry (oui.py)."""
