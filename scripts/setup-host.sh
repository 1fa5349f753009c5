#!/bin/bash
# Usage: scripts/setup-host.sh --for test|lab|all [--list]
# Installs the Debian 12 packages `make test` (--for test) or `make lab` (--for lab) needs on this host,
# only those missing, and says which and why. Used by `make test`, `make lab` and `.ci/run`; needs root
# (the Makefile adds sudo). Idempotent and fast when everything is there (one dpkg-query, no apt).
# - waits for another apt/dpkg (the dpkg and lists locks) up to 10 minutes instead of failing;
# - never upgrades what is installed: no `upgrade`, --no-install-recommends, and packages built from
#   systemd's source (systemd-container) are pinned to the installed systemd's version, so adding
#   systemd-nspawn does not pull a newer systemd onto the host.
# --list prints the table below (package, for, what callers use from it) for tests/test_setup.py.
set -euo pipefail

# package | for (test, lab, both) | what callers use from it: executables, else a path or library | why
read -r -d '' PACKAGES <<'TABLE' || true
make               | both | make                                  | the README's commands (make test, make lab)
python3.11-venv    | both | /usr/lib/python3.11/ensurepip         | the Makefile's .venv and .venv-deploy
python3            | both | python3                               | the system interpreter: proc's reader as an unprivileged user (tests), lab scripts on the machines
openssl            | test | openssl                               | PKI tests cross-check certificates with openssl
systemd            | test | systemd-analyze                       | unit exposure checks (offline)
mount              | test | mount umount                          | full-disk tests on a small tmpfs
chromium           | test | chromium                              | UI end-to-end test (headless)
fonts-dejavu-core  | test | /usr/share/fonts/truetype/dejavu      | ...a font for it to render with
iputils-ping       | test | ping                                  | traffic for the flow tests
snmpd              | test | snmpd                                 | the snmp agent's real peer
snmp               | test | snmpget snmptrap snmpinform            | snmp tests query snmpd and send traps and informs
curl               | test | curl                                  | proc: a download piped into a shell
strace             | test | strace                                | proc: the reader under the unit's user makes no sched_setscheduler call
tcpdump            | test | tcpdump                               | flow tests: MPLS and fragment captures
tshark             | test | tshark                                | ...checked against Wireshark's dissectors
logrotate          | test | logrotate                             | auth tests rotate logs the way Debian does
ieee-data          | test | /usr/share/ieee-data/oui.txt          | MAC vendor names for the scanner
libpcap0.8         | test | libpcap.so.0.8                        | the flow agent compiles BPF filters with libpcap
nats-server        | test | nats-server                           | hub cluster tests: a 3-node JetStream on loopback
iproute2           | both | ip                                    | network namespaces (tests); the lab bridge
procps             | both | pgrep pkill sysctl uptime             | test peers; nspawn machines; ip_forward
util-linux         | both | nsenter setsid                        | entering and starting nspawn machines
debootstrap        | both | debootstrap                           | the rootfs of Molecule and lab machines
systemd-container  | both | systemd-nspawn                        | ...booted with real systemd
nftables           | both | nft                                   | ...NAT on their private bridge
openssh-client     | both | ssh ssh-keygen                        | ...reached over SSH by ansible and testinfra
TABLE

usage() { echo "usage: $0 --for test|lab|all [--list]" >&2; exit 2; }
target='' list=false
while [ $# -gt 0 ]; do
  case "$1" in
    --for) target=${2:-}; shift 2 || usage ;;
    --list) list=true; shift ;;
    *) usage ;;
  esac
done
if $list; then echo "$PACKAGES"; exit 0; fi
case "$target" in test|lab|all) ;; *) usage ;; esac

wanted=() why=()
while IFS='|' read -r package scope _ reason; do
  package=${package// /} scope=${scope// /}
  if [ "$target" = all ] || [ "$scope" = both ] || [ "$scope" = "$target" ]; then
    wanted+=("$package"); why+=("$package:$reason")
  fi
done <<<"$PACKAGES"

installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${wanted[@]}" 2>/dev/null | awk '$2 == "ii" {print $1}' || true)
missing=() reasons=()
for i in "${!wanted[@]}"; do
  grep -qxF "${wanted[$i]}" <<<"$installed" || { missing+=("${wanted[$i]}"); reasons+=("${why[$i]}"); }
done
if [ ${#missing[@]} -eq 0 ]; then echo "setup-host ($target): all ${#wanted[@]} packages present"; exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host ($target): missing ${missing[*]}; run as root (or: sudo $0 --for $target)" >&2; exit 1
fi

echo "setup-host ($target): installing ${#missing[@]} missing packages:"
printf '  %s\n' "${reasons[@]}"
# systemd-container must match the installed systemd, or apt upgrades systemd along with it.
systemd_version=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
for i in "${!missing[@]}"; do
  if [ "${missing[$i]}" = systemd-container ] && [ -n "$systemd_version" ]; then
    missing[i]="systemd-container=$systemd_version"
  fi
done
apt_wait=(-o DPkg::Lock::Timeout=600)   # waits for the dpkg lock (apt >= 1.9.11; Debian 12 has 2.6)
update_with_lock_wait() {               # the lists lock has no timeout option: retry while it is held
  for _ in $(seq 1 120); do
    if out=$(apt-get "${apt_wait[@]}" update -q 2>&1); then return 0; fi
    grep -q 'Could not get lock' <<<"$out" || { echo "$out" >&2; return 1; }
    echo "setup-host: waiting for another apt (lists lock)"; sleep 5
  done
  echo "$out" >&2; return 1
}
update_with_lock_wait
DEBIAN_FRONTEND=noninteractive apt-get "${apt_wait[@]}" install -y -q --no-install-recommends "${missing[@]}"
