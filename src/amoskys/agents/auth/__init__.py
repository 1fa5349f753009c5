"""auth: the agent (agent.py), the auth log's line formats (lines.py) and the brute-force rule (brute.py)."""
