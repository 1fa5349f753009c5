"""The hub's trust map binds each agent_id to its public key and the host and kind it was enrolled for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fleet import AGENT_HOSTS, ALL_HOSTS, HOST_AGENTS, HUB, host_vars, machine

TRUST_MAP = "/etc/amoskys/trust/agents.yml"
CA_DIR = Path(host_vars(ALL_HOSTS[0])["amoskys_pki_ca_dir"])
EARLIER_RELEASE = CA_DIR.parent / "legacy"  # keys molecule/shared/prepare.yml installed as an earlier release did


def public_key(name: str, agent_id: str) -> str:
    return str(machine(name).check_output(f"cat /etc/amoskys/signing/{agent_id}.key.pub")).strip()


def expected_entries(names: list[str]) -> dict[str, dict[str, str]]:
    return {
        f"{name}-{kind}": {"key": public_key(name, f"{name}-{kind}"), "host": name, "kind": kind}
        for name, kind in HOST_AGENTS
        if name in names
    }


def test_hub_trust_map_is_structured() -> None:
    """agent_id: {key, host, kind} for every agent of the inventory; host is what each agent's config says."""
    document = yaml.safe_load(machine(HUB).check_output(f"cat {TRUST_MAP}"))
    assert document == expected_entries(AGENT_HOSTS)
    for name, kind in HOST_AGENTS:
        config = yaml.safe_load(machine(name).check_output(f"cat /etc/amoskys/agent-{kind}.yml"))
        assert (config["agent_id"], config["host"]) == (f"{name}-{kind}", document[config["agent_id"]]["host"])


@pytest.mark.parametrize("name", AGENT_HOSTS)
def test_controller_trust_files_are_structured(name: str) -> None:
    """The per-host files amoskys_pki collects (a plain-form file of an earlier release is rewritten)."""
    document = yaml.safe_load((CA_DIR / "trust" / f"{name}.yml").read_text())
    assert document == expected_entries([name])


@pytest.mark.parametrize("pub", sorted(EARLIER_RELEASE.glob("*.key.pub")), ids=lambda p: p.name)
def test_signing_keys_of_an_earlier_release_are_kept(pub: Path) -> None:
    agent_id = pub.name.removesuffix(".key.pub")
    name = agent_id.removesuffix("-proc")
    assert public_key(name, agent_id) == pub.read_text().strip()
