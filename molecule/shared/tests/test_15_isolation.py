"""Each service reads only its own secrets: tried with the running process's own credentials (setpriv)."""

from __future__ import annotations

import functools
import shlex

import pytest
from fleet import (
    ALL_HOSTS,
    EVENTBUS,
    HOST_UNITS,
    HUB,
    INDEXER,
    INDEXER_HOSTS,
    LEGACY_USER,
    SHARED_GROUP,
    UI,
    ids,
    machine,
    main_pid,
    private_keys,
    service_user,
    unit_config_path,
    unit_kind,
    unit_property,
    units_on,
)

CA_CERT = "/etc/amoskys/tls/ca.crt"
OPERATOR_KEY = "/etc/amoskys/tls/operator.key"  # root's identity for the CLI on the hub
TRUST_MAP = "/etc/amoskys/trust/agents.yml"
# groups a unit's drop-in adds (SupplementaryGroups=) besides its own and the shared one
DROPIN_GROUPS = {"auth": {"adm", "systemd-journal"}}


def secrets_of(name: str, unit: str) -> list[str]:
    """Files only this unit may read: its private keys, its configuration, the hub's trust map."""
    paths = [*private_keys(name, unit), unit_config_path(unit)]
    if unit == EVENTBUS:
        paths.append(TRUST_MAP)
    return paths


@functools.cache
def credentials(name: str, unit: str) -> tuple[str, str, str]:
    """uid, gid and supplementary gids (comma-separated) of the unit's running main process."""
    status = machine(name).check_output(f"cat /proc/{main_pid(name, unit)}/status")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid, gid = fields["Uid"].split()[0], fields["Gid"].split()[0]
    return uid, gid, ",".join(fields["Groups"].split())


def read_as(name: str, unit: str, paths: list[str]) -> dict[str, str]:
    """{path: 'read' | 'denied' | error} when the unit's process credentials open each path (one round trip)."""
    uid, gid, groups = credentials(name, unit)
    setpriv = f"setpriv --reuid={uid} --regid={gid} --groups={groups} --"
    script = "; ".join(
        f"if out=$({setpriv} head -c1 {shlex.quote(p)} 2>&1 >/dev/null); then echo read; "
        f'else case "$out" in *"Permission denied"*) echo denied;; *) echo "error $out";; esac; fi'
        for p in paths
    )
    return dict(zip(paths, machine(name).check_output(script).splitlines(), strict=True))


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_runs_as_its_own_user_and_groups(name: str, unit: str) -> None:
    host = machine(name)
    user = service_user(unit)
    uid, gid, groups = credentials(name, unit)
    assert (uid, gid) == (str(host.user(user).uid), str(host.group(user).gid)), f"{unit}: {uid}:{gid}"
    names = {host.check_output(f"getent group {g} | cut -d: -f1") for g in groups.split(",")}
    assert names == {user, SHARED_GROUP} | DROPIN_GROUPS.get(unit_kind(unit), set()), names


@pytest.mark.parametrize(("name", "unit"), HOST_UNITS, ids=ids(HOST_UNITS))
def test_reads_its_own_secrets_and_the_ca(name: str, unit: str) -> None:
    """The control for the test below: the same credentials do open the unit's own files."""
    paths = [*secrets_of(name, unit), CA_CERT]
    assert read_as(name, unit, paths) == dict.fromkeys(paths, "read")


OTHERS = [(name, reader, owner) for name in ALL_HOSTS for reader in units_on(name) for owner in units_on(name)
          if reader != owner]  # fmt: skip


@pytest.mark.parametrize(("name", "reader", "owner"), OTHERS, ids=[f"{n}/{r}->{o}" for n, r, o in OTHERS])
def test_cannot_read_another_services_secrets(name: str, reader: str, owner: str) -> None:
    """E.g. the UI cannot read the hub's server key or trust map, nor an agent's keys; no agent the hub's key."""
    paths = secrets_of(name, owner)
    assert read_as(name, reader, paths) == dict.fromkeys(paths, "denied")


@pytest.mark.parametrize(("name", "unit"), [(n, u) for n, u in HOST_UNITS if n == HUB], ids=lambda v: v)
def test_cannot_read_the_operator_key(name: str, unit: str) -> None:
    assert read_as(name, unit, [OPERATOR_KEY]) == {OPERATOR_KEY: "denied"}


@pytest.mark.parametrize("name", ALL_HOSTS)
def test_only_public_files_are_world_readable(name: str) -> None:
    """Certificates and public keys may be read by anyone; configs, keys and the trust map by their service only."""
    host = machine(name)
    found = host.check_output("find /etc/amoskys -type f -perm /o=rwx").split()
    assert [p for p in found if not p.endswith((".crt", ".pub", ".pem"))] == []
    for path in ("/etc/amoskys", "/etc/amoskys/tls", "/etc/amoskys/signing", "/var/lib/amoskys"):
        directory = host.file(path)
        assert (directory.user, directory.group, directory.mode) == ("root", SHARED_GROUP, 0o750), path


@pytest.mark.parametrize("name", ALL_HOSTS)
def test_single_user_of_earlier_releases_is_gone(name: str) -> None:
    host = machine(name)
    assert host.run(f"getent passwd {LEGACY_USER}").rc == 2
    dirs = [d for d in ("/etc/amoskys", "/var/lib/amoskys", "/var/log/amoskys") if host.file(d).exists]
    assert host.check_output(f"find {' '.join(dirs)} -nouser -o -nogroup") == ""


PTRACE_UNITS = [(n, u) for n, u in HOST_UNITS if unit_kind(u) in {"proc", "host"}]  # CAP_SYS_PTRACE drop-ins


@pytest.mark.parametrize(("name", "unit"), PTRACE_UNITS, ids=ids(PTRACE_UNITS))
def test_ptrace_capability_does_not_reach_other_processes_memory(name: str, unit: str) -> None:
    """proc and host read every /proc entry (CAP_SYS_PTRACE), but not the hub's memory via process_vm_readv."""
    allowed = unit_property(name, unit, "SystemCallFilter").split()
    assert "cap_sys_ptrace" in unit_property(name, unit, "AmbientCapabilities")
    assert "read" in allowed, allowed[:20]  # an allow list, as systemd resolved it
    assert not {"process_vm_readv", "process_vm_writev"} & set(allowed)


INDEX = "/var/lib/amoskys/index/events.db"  # a hub cluster's index: the indexer writes it, the hub there reads it


@pytest.mark.parametrize("name", INDEXER_HOSTS)
def test_only_the_hub_and_the_indexer_read_the_index(name: str) -> None:
    assert read_as(name, INDEXER, [INDEX]) == {INDEX: "read"}
    assert read_as(name, EVENTBUS, [INDEX]) == {INDEX: "read"}
    if name == HUB:
        assert read_as(name, UI, [INDEX]) == {INDEX: "denied"}
    directory = machine(name).file(INDEX.rpartition("/")[0])
    assert (directory.user, directory.group, directory.mode) == ("amoskys-indexer", "amoskys-hub", 0o2750)
