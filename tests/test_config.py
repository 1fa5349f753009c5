"""Config: defaults are valid, overrides work, and every bad input names file, key and expectation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amoskys.agents import agent_config_type
from amoskys.agents.snmp.config import SnmpAgentConfig
from amoskys.catalog import AGENT_KINDS
from amoskys.cli import main
from amoskys.config import AgentConfig, EventBusConfig, UiConfig, load_config
from amoskys.errors import ConfigError, IdentityError
from amoskys.keyfile import check_identity_name


def write(tmp_path: Path, text: str, name: str = "eventbus.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("schema", [EventBusConfig, AgentConfig, UiConfig])
def test_defaults_are_valid(schema: type) -> None:
    load_config(None, schema, env={})


@pytest.mark.parametrize("kind", sorted(AGENT_KINDS))
def test_every_agent_names_a_schema_with_valid_defaults(kind: str) -> None:
    """The registry leads to each agent's schema: the common part plus the agent's own section."""
    schema = agent_config_type(kind)
    assert issubclass(schema, AgentConfig) and schema is not AgentConfig
    load_config(None, schema, env={})


def test_another_agents_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "flow: {interfaces: [eth0]}\n", "agent-proc.yml")
    with pytest.raises(ConfigError, match=r"agent-proc.yml: key 'flow': unknown key; known keys: .*\bproc\b"):
        load_config(path, agent_config_type("proc"), env={})


def test_values_and_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:7000\nstore:\n  retention_days: 3\n")
    env = {"AMOSKYS_STORE__MAX_BYTES": "1000", "AMOSKYS_CONSUMERS": "[ui, ops]", "HOME": "/x"}
    config = load_config(path, EventBusConfig, env=env)
    assert config.listen == "127.0.0.1:7000"
    assert config.store.retention_days == 3
    assert config.store.max_bytes == 1000
    assert config.consumers == ["ui", "ops"]


BAD_INPUTS = [
    ("stor: {}\n", "key 'stor': unknown key; did you mean 'store'?"),
    ("store: {retntion_days: 3}\n", "key 'store.retntion_days': unknown key; did you mean 'retention_days'?"),
    ("store: {retention_days: -1}\n", "key 'store.retention_days': expected float > 0.0"),
    ("store: {retention_days: soon}\n", "key 'store.retention_days': expected float, got str"),
    ("listen: nowhere\n", "key 'listen': expected 'host:port', got 'nowhere'"),
    ("listen: 'h:99999'\n", "key 'listen': port 99999 is out of range"),
    ("store: {path: [1, 2]}\n", "key 'store.path': expected str, got array"),
    (
        "logging: {level: loud}\n",
        "key 'logging.level': expected one of 'debug', 'info', 'warning', 'error', got 'loud'",
    ),
    ("- a\n- b\n", "expected a mapping of keys at the top level, got list"),
    ("store: [\n", "invalid YAML at line 2"),
    ("consumers: ['bad id!']\n", "key 'consumers[0]': expected an identity name: 1-64 letters"),
    ("backpressure: {base_backoff_ms: 99999}\n", "key 'backpressure': base_backoff_ms must not exceed"),
    ("limits: {max_events_per_batch: 0}\n", "key 'limits.max_events_per_batch': expected int >= 1"),
    ("metrics: {listen: 9124}\n", "key 'metrics.listen': expected str, got int"),
    ("store: {backend: postgres}\n", "key 'store.backend': expected one of 'sqlite', 'jetstream', got 'postgres'"),
    ("nats: {servers: []}\n", "key 'nats.servers': at least one NATS server address is needed"),
    ("nats: {servers: ['nats://a b:4222']}\n", "key 'nats.servers': expected 'host:port' or 'tls://host:port'"),
    ("nats: {replicas: 7}\n", "key 'nats.replicas': expected int <= 5"),
    ("nats: {stream: 'a.b'}\n", "key 'nats.stream': expected str matching regex"),
    ("nats: {subject_prefix: 'a.>'}\n", "key 'nats.subject_prefix': expected str matching regex"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_INPUTS)
def test_bad_eventbus_config_is_explained(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, EventBusConfig, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert expected.replace("'", "") in message.replace("'", "").replace("`", ""), message


def test_bad_agent_sections_are_explained(tmp_path: Path) -> None:
    path = write(
        tmp_path, "snmp:\n  targets:\n    - {name: sw1, address: 10.0.0.1, version: '3', user: u}\n", "agent.yml"
    )
    with pytest.raises(ConfigError, match=r"snmp.targets\[0\].*version 3 needs user, auth_key and priv_key"):
        load_config(path, SnmpAgentConfig, env={})


@pytest.mark.parametrize("agent_id", ["has space", "web1\n", "a" * 65, "../x", "/abs", ".", "..", "-x"])
def test_bad_agent_id_is_explained(tmp_path: Path, agent_id: str) -> None:
    path = write(tmp_path, f"agent_id: {json.dumps(agent_id)}\n", "agent.yml")  # JSON is YAML
    with pytest.raises(ConfigError, match="key 'agent_id': expected an identity name: 1-64 letters, digits"):
        load_config(path, AgentConfig, env={})


def test_agent_ids_are_exactly_the_names_a_certificate_can_carry() -> None:
    longest = "w" * 64
    assert load_config(None, AgentConfig, env={"AMOSKYS_AGENT_ID": longest}).agent_id == longest
    assert check_identity_name(longest, "common name") == longest
    with pytest.raises(IdentityError, match=r"common name 'w{65}' is not a valid identity: expected 1-64 letters"):
        check_identity_name(longest + "w", "common name")


NON_FINITE_AND_HUGE = [
    ("agent.yml", AgentConfig, "heartbeat_s: .inf\n", "key 'heartbeat_s': expected float <= 31622400"),
    ("agent.yml", AgentConfig, "heartbeat_s: .nan\n", "key 'heartbeat_s': expected float > 0.0"),
    ("agent.yml", AgentConfig, "heartbeat_s: -.inf\n", "key 'heartbeat_s': expected float > 0.0"),
    ("agent-snmp.yml", SnmpAgentConfig, "snmp: {interval_s: 1e400}\n", "key 'snmp.interval_s': number out of range"),
    ("agent.yml", AgentConfig, "outbox: {max_age_days: .inf}\n", "key 'outbox.max_age_days': expected float <= 36500"),
    (
        "agent.yml",
        AgentConfig,
        "batch: {max_linger_ms: 9223372036854775808}\n",
        "key 'batch.max_linger_ms': expected int <= 9223372036854775807",
    ),
    ("eventbus.yml", EventBusConfig, "store: {retention_days: .NaN}\n", "key 'store.retention_days': expected float"),
    ("eventbus.yml", EventBusConfig, "store: {max_bytes: 1e999}\n", "key 'store.max_bytes': number out of range"),
    (
        "eventbus.yml",
        EventBusConfig,
        "store: {max_bytes: 99999999999999999999}\n",
        "key 'store.max_bytes': expected int <= 922",
    ),
    ("eventbus.yml", EventBusConfig, "drain_timeout_s: .Inf\n", "key 'drain_timeout_s': expected float <= "),
    ("ui.yml", UiConfig, "refresh_s: .inf\n", "key 'refresh_s': expected float <= 31622400"),
]


@pytest.mark.parametrize(("name", "schema", "text", "expected"), NON_FINITE_AND_HUGE)
def test_every_number_is_finite_and_fits_int64(
    tmp_path: Path, name: str, schema: type, text: str, expected: str
) -> None:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as caught:
        load_config(path, schema, env={})
    assert str(caught.value).startswith(f"{path}: {expected}"), caught.value


def test_infinite_env_override_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"AMOSKYS_HEARTBEAT_S\): key 'heartbeat_s': expected float <="):
        load_config(None, AgentConfig, env={"AMOSKYS_HEARTBEAT_S": ".inf"})


def test_config_check_refuses_infinity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "heartbeat_s: .inf\n", "agent-proc.yml")
    assert main(["config", "check", str(path)]) == 2
    assert f"{path}: key 'heartbeat_s': expected float <= 31622400" in capsys.readouterr().err


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yml: cannot read config: No such file"):
        load_config(tmp_path / "nope.yml", EventBusConfig, env={})


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "eventbus.yml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, EventBusConfig, env={})


def test_unknown_env_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment AMOSKYS_STORE__RETENTION: .*did you mean 'retention_days'"):
        load_config(None, EventBusConfig, env={"AMOSKYS_STORE__RETENTION": "3"})


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"with AMOSKYS_STORE__RETENTION_DAYS\): key 'store.retention_days'"):
        load_config(None, EventBusConfig, env={"AMOSKYS_STORE__RETENTION_DAYS": "[1]"})


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(
        tmp_path, "snmp:\n  targets:\n    - {name: sw1, address: 10.0.0.1, community: s3cret}\n", "agent-snmp.yml"
    )
    assert main(["config", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid agent-snmp config" in out
    assert "s3cret" not in out
    bad = write(tmp_path, "listen: x\n", "eventbus.yml")
    assert main(["config", "check", str(bad)]) == 2
    assert "key 'listen'" in capsys.readouterr().err


def test_agent_hub_takes_a_list_of_addresses(tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text("hub: [hub1:50051, hub2:50051]\n")
    assert load_config(path, AgentConfig, env={}).hubs() == ["hub1:50051", "hub2:50051"]
    path.write_text("hub: hub1:50051\n")
    assert load_config(path, AgentConfig, env={}).hubs() == ["hub1:50051"]
    for bad, error in (("hub: []\n", "at least one address"), ("hub: [hub1:50051, nope]\n", "expected 'host:port'")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=error):
            load_config(path, AgentConfig, env={})


def test_config_check_takes_the_agent_kind_from_the_option_or_the_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The role validates a temporary file (`--component agent-KIND`); people name the file agent-KIND.yml."""
    text = "host_metrics: {interval_s: 0}\n"
    anonymous = write(tmp_path, text, "tmp1234")
    assert main(["config", "check", "--component", "agent-host", str(anonymous)]) == 2
    assert "key 'host_metrics.interval_s': expected float > 0.0" in capsys.readouterr().err
    named = write(tmp_path, text, "agent-host.yml")
    assert main(["config", "check", "--component", "agent", str(named)]) == 2
    assert "key 'host_metrics.interval_s'" in capsys.readouterr().err
    assert main(["config", "check", "--component", "agent", str(anonymous)]) == 2  # the common part only
    assert "key 'host_metrics': unknown key" in capsys.readouterr().err


def test_the_runtime_refuses_a_config_without_the_agents_section() -> None:
    from amoskys.agents.runtime.runner import AgentRuntime

    with pytest.raises(TypeError, match="the host agent runs on HostAgentConfig, not AgentConfig"):
        AgentRuntime("host", None, AgentConfig())
