"""flow: the agent (agent.py) and the packet parser, pcap reader and capture socket (packets.py)."""
