#!/bin/bash
# Usage: nspawn-start.sh NAME ROOTFS [extra systemd-nspawn args...]
# Boots ROOTFS with systemd as PID 1 in the background on a host whose PID 1 is NOT systemd, and waits
# until systemd inside reports running/degraded. NAME is the machine and host name (unique on this host).
# Optional env: NSPAWN_IP=10.231.12.10/24 [NSPAWN_GW=10.231.12.1]: static address on host0 after boot.
# State: /run/amoskys-nspawn/NAME.{pid,leader,log}; a machine already running is left alone.
set -euo pipefail
name=$1; rootfs=$(readlink -f "$2"); shift 2   # a versioned rootfs: pin the version it boots
state=/run/amoskys-nspawn; mkdir -p "$state"
if [ -f "$state/$name.pid" ] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
  echo "$name: already running (leader $(cat "$state/$name.leader" 2>/dev/null))"; exit 0
fi
# Own cgroup per machine: with no systemd on the host to hand out scopes, --keep-unit would put every
# machine's payload/supervisor at the cgroup root, where the second machine collides with the first.
for h in systemd unified; do
  if [ -d /sys/fs/cgroup/$h ]; then mkdir -p /sys/fs/cgroup/$h/machine-$name; fi
done
(
  for h in systemd unified; do
    if [ -d /sys/fs/cgroup/$h ]; then echo $BASHPID > /sys/fs/cgroup/$h/machine-$name/cgroup.procs; fi
  done
  exec setsid systemd-nspawn --quiet --keep-unit --register=no --boot \
       --machine="$name" --directory="$rootfs" "$@" </dev/null >"$state/$name.log" 2>&1
) &
echo $! > "$state/$name.pid"
for _ in $(seq 1 300); do
  leader=$(pgrep -P "$(cat "$state/$name.pid")" 2>/dev/null | head -1 || true)   # systemd = nspawn's child
  if [ -n "$leader" ]; then
    st=$(nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null || true)
    case "$st" in running|degraded)
      echo "$leader" > "$state/$name.leader"
      # nspawn lays a random boot id over /proc/sys/kernel/random/boot_id, but a sandboxed unit that gets a
      # fresh /proc (ProtectProc=, ProtectKernelTunables=, ProtectControlGroups=) reads the kernel's own: its
      # `journalctl --follow` then waits for entries of a boot that journald never writes. One boot id for all,
      # as on a real host: drop the overlay and let journald restart with the kernel's id.
      nsenter -t "$leader" -a umount -l /proc/sys/kernel/random/boot_id
      nsenter -t "$leader" -a systemctl restart systemd-journald
      if [ -n "${NSPAWN_IP:-}" ]; then   # needs --network-bridge / --network-veth
        nsenter -t "$leader" -n ip addr replace "$NSPAWN_IP" dev host0
        nsenter -t "$leader" -n ip link set host0 up
        if [ -n "${NSPAWN_GW:-}" ]; then nsenter -t "$leader" -n ip route replace default via "$NSPAWN_GW"; fi
      fi
      echo "$name: $st (leader $leader)"; exit 0;;
    esac
  fi
  kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || { echo "$name: systemd-nspawn exited"; cat "$state/$name.log"; exit 1; }
  sleep 0.2
done
echo "$name: timeout waiting for systemd"; cat "$state/$name.log"; exit 1
