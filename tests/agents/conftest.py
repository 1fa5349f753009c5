"""Agents against a live hub: configs with real certs, keys registered in the hub's trust map."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from amoskys import keys
from amoskys.agents import agent_config_type
from amoskys.agents.proc.connector import ConnectorUnavailable, ProcConnector
from amoskys.agents.runtime.realtime import keep_for_helpers
from amoskys.config import AgentConfig, load_config
from amoskys.errors import ConfigError
from tests.hubfixture import LiveHub


def agent_config(live_hub: LiveHub, tmp_path: Path, kind: str, **sections: Any) -> AgentConfig:
    """An agent config whose identity the hub trusts (agent_id test-KIND, enrolled for host testhost)."""
    agent_id = f"test-{kind}"
    key_path, cert_path = live_hub.pki.issue(agent_id, "client")
    signing = tmp_path / f"{agent_id}.sign"
    keys.write_private_key(signing, keys.generate_signing_key())
    pub = keys.public_key_text(keys.load_signing_key(signing).public_key())
    entry = {agent_id: {"key": pub, "host": "testhost", "kind": kind}}
    (Path(live_hub.config.trust_map) / f"{agent_id}.yml").write_text(yaml.safe_dump(entry))
    live_hub.hub.trust.reload()
    document: dict[str, Any] = {
        "agent_id": agent_id,
        "host": "testhost",
        "hub": live_hub.address,
        "hub_server_name": "localhost",
        "tls": {"ca": str(live_hub.pki.ca_cert), "cert": str(cert_path), "key": str(key_path)},
        "signing_key": str(signing),
        "state_dir": str(tmp_path / f"state-{kind}"),
        "heartbeat_s": 1.0,
        "batch": {"max_events": 200, "max_linger_ms": 100},
        "logging": {"level": "debug", "format": "text"},
        **sections,
    }
    return msgspec.convert(document, agent_config_type(kind))


def section_error(tmp_path: Path, kind: str, text: str) -> str:
    """Why an `agent-KIND.yml` holding `text` is refused at load: the message after the file's name."""
    path = tmp_path / f"agent-{kind}.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, agent_config_type(kind), env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    return message.removeprefix(f"{path}: ")


@pytest.fixture
def connector() -> Iterator[ProcConnector]:
    """The kernel's process-event connector, or the test skipped where it is unavailable."""
    try:
        conn = ProcConnector()
    except ConnectorUnavailable as exc:
        pytest.skip(f"no process connector here: {exc}")
    yield conn
    conn.close()


@pytest.fixture(scope="session", autouse=True)
def realtime_as_proc_unit_gives_it() -> None:
    """As proc's unit starts the agent (CPUSchedulingPolicy=fifo, where root may): the helpers the agents start
    here (proc's reader) run at real-time priority, the rest of the tests as normal tasks."""
    if os.geteuid() != 0:
        return

    def keep() -> None:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        keep_for_helpers()

    starter = threading.Thread(target=keep, name="as-proc-unit")
    starter.start()
    starter.join()
