#!/bin/bash
# Usage: bridge-up.sh BRIDGE GATEWAY_CIDR   e.g. bridge-up.sh br-amx-lab 10.231.12.1/24
# A private bridge that only the test machines use (addresses this project owns).
set -euo pipefail
br=$1; cidr=$2
ip link show "$br" >/dev/null 2>&1 || ip link add "$br" type bridge
ip addr replace "$cidr" dev "$br"
ip link set "$br" up
