"""proc: the agent (agent.py), the kernel's process-event connector (connector.py) and the alert rules (rules.py)."""
