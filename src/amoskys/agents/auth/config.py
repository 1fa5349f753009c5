"""auth's settings: where the auth log is read and the brute-force rule (section `auth` of agent-auth.yml)."""

from __future__ import annotations

from typing import Literal

from amoskys.config import AgentConfig, Positive, Seconds, Section

__all__ = ["AuthAgentConfig", "AuthConfig"]


class AuthConfig(Section, frozen=True):
    source: Literal["auto", "file", "journal"] = "auto"
    log_path: str = "/var/log/auth.log"
    brute_force_failures: Positive = 5
    brute_force_window_s: Seconds = 60.0


class AuthAgentConfig(AgentConfig, frozen=True):
    auth: AuthConfig = AuthConfig()
