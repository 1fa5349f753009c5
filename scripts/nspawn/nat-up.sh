#!/bin/bash
# Usage: nat-up.sh SUBNET   e.g. nat-up.sh 10.231.12.0/24
# Masquerade the machines' traffic out of the host, so DNS answers (otherwise each lookup inside a
# machine waits 10 s) and the apt mirror is reachable. One rule per subnet in table ip amoskys_nat.
# The first user also records net.ipv4.ip_forward before setting it to 1; net-down.sh puts it back
# when it removes the table's last rule.
set -euo pipefail
subnet=$1
saved=/run/amoskys-nspawn/ip_forward.before
command -v nft >/dev/null || "$(dirname "$0")/../setup-host.sh" --for lab
mkdir -p "$(dirname "$saved")"
[ -f "$saved" ] || sysctl -n net.ipv4.ip_forward > "$saved"
sysctl -qw net.ipv4.ip_forward=1
nft list table ip amoskys_nat >/dev/null 2>&1 || nft -f - <<NFT
table ip amoskys_nat {
  chain postrouting { type nat hook postrouting priority srcnat; }
}
NFT
rules=$(nft list chain ip amoskys_nat postrouting)   # (not grep -q on a pipe: SIGPIPE under pipefail)
grep -qF "ip saddr $subnet " <<<"$rules" ||
  nft add rule ip amoskys_nat postrouting ip saddr "$subnet" ip daddr != "$subnet" masquerade comment "\"$subnet\""
