#!/bin/bash
# Usage: nspawn-stop.sh NAME...  -- clean poweroff of the machines (all at once), wait for their
# systemd-nspawn to exit (SIGKILL after 30 s), remove their cgroups. Machines not running are skipped.
state=/run/amoskys-nspawn
running=()
for name in "$@"; do
  pid=$(cat "$state/$name.pid" 2>/dev/null || true)
  leader=$(cat "$state/$name.leader" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    if [ -n "$leader" ]; then kill -s SIGRTMIN+4 "$leader" 2>/dev/null || true; fi   # systemd: poweroff
    running+=("$name:$pid")
  fi
done
for entry in "${running[@]}"; do
  name=${entry%%:*}; pid=${entry#*:}
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then echo "$name: no clean poweroff in 30 s, killing"; kill -KILL "$pid" || true; fi
done
for name in "$@"; do
  for h in systemd unified; do
    d=/sys/fs/cgroup/$h/machine-$name
    if [ -d "$d" ]; then find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
  done
  rm -f "$state/$name.pid" "$state/$name.leader"
  echo "$name: stopped"
done
