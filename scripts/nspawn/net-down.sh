#!/bin/bash
# Usage: net-down.sh BRIDGE SUBNET  -- undo bridge-up.sh and nat-up.sh (run after the machines are stopped):
# the bridge, the subnet's NAT rule, and once no subnet uses NAT any more the table and ip_forward as it was.
set -uo pipefail
br=$1; subnet=$2
saved=/run/amoskys-nspawn/ip_forward.before
if ip link show "$br" >/dev/null 2>&1; then ip link del "$br"; fi
handle=$(nft -a list chain ip amoskys_nat postrouting 2>/dev/null | grep -F "ip saddr $subnet " | sed -n 's/.*# handle \([0-9]*\).*/\1/p')
for h in $handle; do nft delete rule ip amoskys_nat postrouting handle "$h"; done
rules=$(nft list chain ip amoskys_nat postrouting 2>/dev/null)   # (grep -q on a pipe: SIGPIPE, pipefail)
if grep -q masquerade <<<"$rules"; then :; else
  nft delete table ip amoskys_nat 2>/dev/null || true
  if [ -f "$saved" ]; then sysctl -qw net.ipv4.ip_forward="$(cat "$saved")" && rm -f "$saved"; fi
fi
