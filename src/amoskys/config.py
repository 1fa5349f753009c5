"""Typed configuration: one schema per component, loaded from YAML plus `AMOSKYS_...` overrides.

Schemas are msgspec Structs (about 1 MB of RSS, against pydantic's 10 MB: agents have a budget).
Every error names the file (or environment variable), the key, and what was expected.

The common parts (identity, hub, outbox, batching, logging, metrics) live here; each agent's own
section lives next to its code and joins `AgentConfig` in a subclass the agent class names
(`Agent.config_type`): `amoskys.agents.agent_config_type(KIND)` finds it through the registry.

Environment overrides use `__` between levels: `AMOSKYS_STORE__RETENTION_DAYS=7` sets
`store.retention_days`. Values are parsed as YAML scalars, so `7`, `true` and `[a, b]` work.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec
import yaml

from amoskys.errors import ConfigError
from amoskys.keyfile import IDENTITY_NAME, IDENTITY_RULE
from amoskys.masking import mask_secrets

__all__ = [
    "AgentConfig",
    "EventBusConfig",
    "IndexerConfig",
    "NatsConfig",
    "NatsExporterConfig",
    "Section",
    "UiConfig",
    "check_address",
    "dump_config",
    "load_config",
    "parse_address",
]

ENV_PREFIX = "AMOSKYS_"
INT64_MAX = 2**63 - 1  # SQLite integers, protobuf int64 and nanosecond clocks all stop here
MAX_SECONDS = 366 * 86400  # intervals and timeouts: a year at most (finite: .inf and .nan are refused)
MAX_DAYS = 36500  # retention and ages: a century at most, so day counts fit nanoseconds
Positive = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]
Days = Annotated[float, msgspec.Meta(gt=0, le=MAX_DAYS)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
AgentId = Annotated[str, msgspec.Meta(pattern=rf"^{IDENTITY_NAME}\Z")]  # also a certificate CN: one rule
MiB = 1024 * 1024


def parse_address(value: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port`; raise ValueError with the expected form."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not match:
        raise ValueError(f"expected 'host:port', got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every config section: unknown keys are errors, not silently ignored."""


def check_address(value: str, key: str, *, allow_empty: bool = False) -> None:
    """For a section's `__post_init__`: ValueError `KEY: why` unless `value` is `host:port` (or allowed empty)."""
    if allow_empty and not value:
        return
    try:
        parse_address(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


class LoggingConfig(Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class TlsConfig(Section, frozen=True):
    """A TLS identity: the CA that anchors trust, and this component's cert and key."""

    ca: str = "/etc/amoskys/tls/ca.crt"
    cert: str = "/etc/amoskys/tls/host.crt"
    key: str = "/etc/amoskys/tls/host.key"


class StoreConfig(Section, frozen=True):
    # sqlite: the hub writes this file. jetstream: the hub appends to NATS JetStream (`nats:`), `amoskys indexer`
    # writes this file from the stream, and the hub only reads it (Query, Subscribe, ListAgents, GetStatus).
    backend: Literal["sqlite", "jetstream"] = "sqlite"
    path: str = "/var/lib/amoskys/eventbus/events.db"
    retention_days: Days = 30.0
    max_bytes: Positive = 10 * 1024 * MiB
    prune_interval_s: Seconds = 60.0
    synchronous: Literal["full", "normal"] = "full"  # full: an acked event survives power loss too
    checkpoint_interval_s: Seconds = 1.0
    text_index: Literal["trigram", "none"] = "trigram"  # none: text search scans, ingest is faster (BENCHMARKS.md)


class LimitsConfig(Section, frozen=True):
    max_envelope_bytes: Positive = 4 * MiB
    max_events_per_batch: Positive = 5000
    max_event_bytes: Positive = 64 * 1024
    max_clock_skew_s: Seconds = 300.0  # an event stamped further ahead is filed at hub time + this
    max_streams_per_identity: Positive = 8  # PublishStream + Subscribe streams open at once per certificate
    stream_idle_s: Seconds = 300.0  # a publish stream with no envelope for this long is ended (agents reconnect)
    write_timeout_s: Seconds = 10.0  # a consumer that takes no message for this long is cut (resume cursor)
    handshake_timeout_s: Seconds = 10.0  # a connection that has not finished TLS by then is closed


class BackpressureConfig(Section, frozen=True):
    high_water_events: Positive = 100_000
    max_pending_per_agent: Positive = 20_000  # one identity's events waiting for commit, at most
    busy_pending_per_agent: Positive = 2_000  # ...while the event loop is saturated (an envelope at least)
    commit_target_ms: Positive = 25  # a commit group holds what the writer commits in about this time...
    commit_min_events: Positive = 1_000  # ...but at least this many (when waiting)...
    commit_max_events: Positive = 10_000  # ...and at most this many
    commit_part_events: Positive = 250  # a larger commit is written in transactions of this many events
    loop_lag_ms: Positive = 10  # a timer this late means the event loop is saturated: share it among identities
    commit_max_delay_ms: NonNegative = 0  # extra wait to grow a group; 0: commit what is queued now
    base_backoff_ms: Positive = 50
    max_backoff_ms: Positive = 10_000

    def __post_init__(self) -> None:
        if self.base_backoff_ms > self.max_backoff_ms:
            raise ValueError("base_backoff_ms must not exceed max_backoff_ms")


class MetricsConfig(Section, frozen=True):
    # 9124: allocated to a FreeBSD-only exporter, so free on Linux (9100 is node_exporter's); README, Operations.
    listen: str = "127.0.0.1:9124"

    def __post_init__(self) -> None:
        check_address(self.listen, "listen", allow_empty=True)


NATS_SERVER = re.compile(r"(?:(?:nats|tls)://)?(?:[^:/\[\]\s]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")
STREAM_NAME = r"^[A-Za-z0-9_-]{1,64}\Z"
SUBJECT_TOKEN = r"^[A-Za-z0-9_-]{1,64}\Z"  # noqa: S105 (a pattern, not a secret)


class NatsConfig(Section, frozen=True):
    """NATS JetStream for `store.backend: jetstream` (hub) and `amoskys indexer`: where, how safe, how big."""

    servers: list[str] = msgspec.field(default_factory=lambda: ["tls://localhost:4222"])
    tls: bool = True  # mTLS to NATS with `ca`, `cert`, `key` (the fleet CA's); false only for a loopback test
    ca: str = "/etc/amoskys/tls/ca.crt"
    cert: str = "/etc/amoskys/tls/host.crt"
    key: str = "/etc/amoskys/tls/host.key"
    stream: Annotated[str, msgspec.Meta(pattern=STREAM_NAME)] = "AMOSKYS"
    subject_prefix: Annotated[str, msgspec.Meta(pattern=SUBJECT_TOKEN)] = "amoskys"
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 3  # R3: an acked envelope is on a quorum of 2 of 3
    max_age_days: Days = 30.0  # stream retention by age...
    max_bytes: Positive = 50 * 1024 * MiB  # ...and by size (oldest first)
    duplicate_window_s: Seconds = 120.0  # Nats-Msg-Id de-duplication window
    request_timeout_s: Seconds = 5.0  # a PubAck (or stream read) slower than this: the agent is told RETRY
    consumer: Annotated[str, msgspec.Meta(pattern=STREAM_NAME)] = "indexer"  # the indexer's durable consumer

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("servers: at least one NATS server address is needed")
        for server in self.servers:
            if not NATS_SERVER.fullmatch(server):
                raise ValueError(f"servers: expected 'host:port' or 'tls://host:port', got {server!r}")


class EventBusConfig(Section, frozen=True):
    listen: str = "0.0.0.0:50051"
    tls: TlsConfig = TlsConfig(cert="/etc/amoskys/tls/eventbus.crt", key="/etc/amoskys/tls/eventbus.key")
    trust_map: str = "/etc/amoskys/trust"
    crl: str = "/etc/amoskys/tls/crl.pem"
    consumers: list[AgentId] = msgspec.field(default_factory=lambda: ["ui", "operator"])
    store: StoreConfig = StoreConfig()
    nats: NatsConfig = NatsConfig()
    limits: LimitsConfig = LimitsConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
    metrics: MetricsConfig = MetricsConfig()
    drain_timeout_s: Seconds = 20.0
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self) -> None:
        check_address(self.listen, "listen")


class IndexerConfig(Section, frozen=True):
    """`amoskys indexer`: the JetStream stream into the query store (`store.path`, the hubs read it)."""

    nats: NatsConfig = NatsConfig()
    store: StoreConfig = StoreConfig(backend="jetstream")
    batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000  # messages fetched and committed at once
    max_clock_skew_s: Seconds = 300.0  # as the hubs' limits.max_clock_skew_s: later stamps are filed at stream time
    metrics: MetricsConfig = MetricsConfig(listen="127.0.0.1:9127")
    logging: LoggingConfig = LoggingConfig()


class NatsExporterConfig(Section, frozen=True):
    """`amoskys nats-exporter`: the local NATS node's monitoring endpoint (JSON) as Prometheus metrics."""

    monitor_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/]+(/\S*)?\Z")] = "http://127.0.0.1:8222"
    timeout_s: Seconds = 2.0  # a scrape asks the node at most this long (all its requests), then reports up 0
    metrics: MetricsConfig = MetricsConfig(listen="127.0.0.1:9128")
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self) -> None:
        if not self.metrics.listen:
            raise ValueError("metrics: listen must not be empty (the exporter serves its metrics there)")


class OutboxConfig(Section, frozen=True):
    max_bytes: Positive = 256 * MiB
    max_age_days: Days = 7.0
    when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


class BatchConfig(Section, frozen=True):
    max_events: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    max_linger_ms: NonNegative = 500
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8


class AgentConfig(Section, frozen=True):
    """The common agent part; an agent's subclass adds its own section (proc, host_metrics, ...)."""

    agent_id: Annotated[str, msgspec.Meta(pattern=rf"^(?:{IDENTITY_NAME})?\Z")] = ""
    host: str = ""
    hub: str | list[str] = "localhost:50051"  # a list: hubs of a cluster, the next one tried when one is lost
    hub_server_name: str = ""
    tls: TlsConfig = TlsConfig()
    signing_key: str = "/etc/amoskys/signing.key"
    state_dir: str = ""
    outbox: OutboxConfig = OutboxConfig()
    batch: BatchConfig = BatchConfig()
    heartbeat_s: Seconds = 30.0
    metrics: MetricsConfig = MetricsConfig(listen="")
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self) -> None:
        if not self.hubs():
            raise ValueError("hub: at least one address is needed")
        for address in self.hubs():
            check_address(address, "hub")

    def hubs(self) -> list[str]:
        """The hub addresses, in the order they are tried."""
        return [self.hub] if isinstance(self.hub, str) else list(self.hub)

    def resolved_host(self) -> str:
        return self.host or socket.gethostname()

    def resolved_agent_id(self, kind: str) -> str:
        return self.agent_id or f"{self.resolved_host()}-{kind}"

    def resolved_state_dir(self, kind: str) -> Path:
        return Path(self.state_dir or f"/var/lib/amoskys/agent-{kind}")


class UiAuthConfig(Section, frozen=True):
    password_hash: str = ""  # scrypt hash from `amoskys ui hash-password`
    client_certs: bool = False
    client_cns: list[AgentId] = msgspec.field(default_factory=lambda: ["operator"])  # empty: any cert from the CA


class UiConfig(Section, frozen=True):
    listen: str = "127.0.0.1:8080"
    hub: str = "localhost:50051"
    hub_server_name: str = ""
    tls: TlsConfig = TlsConfig(cert="/etc/amoskys/tls/ui.crt", key="/etc/amoskys/tls/ui.key")
    server_tls: bool = False
    auth: UiAuthConfig = UiAuthConfig()
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 10
    refresh_s: Seconds = 5.0  # how often the registry and hub status are sampled (rates, fleet page)
    hub_timeout_s: Seconds = 10.0
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self) -> None:
        check_address(self.listen, "listen")
        check_address(self.hub, "hub")


Schema = TypeVar("Schema", bound=Section)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not UTF-8 text") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: invalid YAML at {where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(document).__name__}")
    return document


def _type_at(schema: type[Section], path: list[str]) -> Any:
    """The declared type reached by following field names `path` from `schema` (None if none)."""
    current: Any = schema
    for part in path:
        if not (isinstance(current, type) and issubclass(current, msgspec.Struct)):
            return None
        current = {f.name: f.type for f in msgspec.structs.fields(current)}.get(part)
        if get_origin(current) is list:  # a list of sections (e.g. snmp.targets): follow its items
            current = get_args(current)[0]
    return current


def _fields_at(schema: type[Section], path: list[str]) -> tuple[str, ...]:
    """Field names of the struct reached by following `path` from `schema` (empty if not a struct)."""
    current = _type_at(schema, path)
    if not (isinstance(current, type) and issubclass(current, msgspec.Struct)):
        return ()
    return tuple(f.name for f in msgspec.structs.fields(current))


def _apply_env(document: dict[str, Any], schema: type[Section], env: Mapping[str, str]) -> list[str]:
    """Fold AMOSKYS_A__B=value into document['a']['b']; return the variables applied."""
    applied = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == "AMOSKYS_CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        known = _fields_at(schema, path[:-1])
        if path[-1] not in known:
            hint = difflib.get_close_matches(path[-1], known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"environment {name}: no config key {'.'.join(path)!r}{suggestion}")
        try:
            value = yaml.safe_load(env[name])
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment {name}: value is not valid YAML: {exc}") from exc
        node = document
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {name}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
        applied.append(name)
    return applied


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _explain(error: msgspec.ValidationError, schema: type[Section]) -> str:
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any string
    message, raw_path = match.group("msg"), match.group("path") or ""
    parts = [p for p in re.split(r"\.|\[(\d+)\]", raw_path) if p]
    key = raw_path.lstrip(".") or "(top level)"
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        field = unknown.group(1)
        known = _fields_at(schema, [p for p in parts if not p.isdigit()])
        hint = difflib.get_close_matches(field, known, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
        full = f"{key}.{field}" if raw_path else field
        return f"key {full!r}: unknown key{suggestion}"
    message = message.replace("`", "")
    if IDENTITY_NAME in message:  # the pattern itself would tell an operator little
        message = f"expected an identity name: {IDENTITY_RULE}"
    if message.startswith("Invalid enum value"):
        choices = get_args(_type_at(schema, [p for p in parts if not p.isdigit()]))
        message = f"expected one of {', '.join(map(repr, choices))}, got {message.split(' ', 3)[-1]}"
    own_key = re.match(r"^([a-z_]+): (.*)$", message, re.DOTALL)
    if own_key:  # a __post_init__ check that names its key
        key = f"{raw_path.lstrip('.')}.{own_key.group(1)}" if raw_path else own_key.group(1)
        message = own_key.group(2)
    return f"key {key!r}: {message[0].lower()}{message[1:]}"


def load_config(path: Path | None, schema: type[Schema], env: Mapping[str, str] | None = None) -> Schema:
    """Load `path` (None: defaults only), apply environment overrides, validate into `schema`."""
    env = os.environ if env is None else env
    origin = str(path) if path else "defaults"
    document = _read_yaml(path) if path else {}
    applied = _apply_env(document, schema, env)
    if applied:
        origin += f" (with {', '.join(applied)})"
    try:
        return msgspec.convert(document, type=schema, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {_explain(exc, schema)}") from exc


def dump_config(config: Section) -> str:
    """The effective configuration as YAML, secrets masked."""
    data = msgspec.to_builtins(config)
    return yaml.safe_dump(mask_secrets(data), sort_keys=False)
