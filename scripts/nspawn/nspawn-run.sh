#!/bin/bash
# Usage: nspawn-run.sh NAME [COMMAND...]  -- run COMMAND (default: a login shell) inside a running machine,
# in all its namespaces, e.g. nspawn-run.sh hub systemctl status 'amoskys-*'
set -euo pipefail
name=$1; shift
leader=$(cat "/run/amoskys-nspawn/$name.leader" 2>/dev/null) || { echo "$name: not running" >&2; exit 1; }
if [ $# -eq 0 ]; then set -- /bin/bash -l; fi
exec nsenter -t "$leader" -a env -i TERM="${TERM:-xterm}" PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"
