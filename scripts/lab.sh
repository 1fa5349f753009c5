#!/bin/bash
# Usage: scripts/lab.sh up|down|quiet [SINCE]   (make lab / make lab-down / make lab-verify)
# up: boot the lab fleet (hub, web1, db1: systemd-nspawn machines on br-amx-lab 10.231.12.0/24), run
# `ansible-playbook -i inventories/lab playbooks/lab.yml` (the lab's snmpd on every machine, then site.yml),
# print how to reach it. Running it again keeps the machines and re-runs the playbook. CLUSTER=1: the hub cluster
# instead of one hub (hub2 and hub3 join hub as NATS + hub nodes, hub is also the indexer: inventories/lab-cluster
# over inventories/lab; README, The hub cluster).
# quiet: 20 SSH logins to every machine, then count the alerts the hub stored since SINCE (an ISO time, UTC;
# default: the logins' start) for every host: fails unless there are none (issue 12: quiet by default).
# down: power the machines off (their overlays are discarded),
# remove the bridge and the NAT rule and restore net.ipv4.ip_forward; what a next `up` reuses stays:
# .lab/ (SSH key, lab CA and its key) and the cached rootfs. Needs root, ansible-playbook on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
nspawn=scripts/nspawn
rootfs=${LAB_ROOTFS:-/var/cache/nspawn-rootfs/amoskys-bookworm}
bridge=br-amx-lab subnet=10.231.12.0/24 gateway=10.231.12.1
machines=(hub:10.231.12.10 web1:10.231.12.11 db1:10.231.12.12)
cluster_machines=(hub2:10.231.12.13 hub3:10.231.12.14)
inventory=(-i inventories/lab)
if [ "${CLUSTER:-0}" != 0 ] && [ "${1:-}" != down ]; then
  machines+=("${cluster_machines[@]}")
  inventory+=(-i inventories/lab-cluster)
fi
key=.lab/id_ed25519
ssh_opts="-i $key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

up() {
  "$nspawn/make-rootfs.sh" "$rootfs"
  "$nspawn/bridge-up.sh" "$bridge" "$gateway/24"
  "$nspawn/nat-up.sh" "$subnet"
  mkdir -p .lab
  [ -f "$key" ] || ssh-keygen -q -t ed25519 -N '' -C amoskys-lab -f "$key"
  for entry in "${machines[@]}"; do
    NSPAWN_IP="${entry#*:}/24" NSPAWN_GW=$gateway "$nspawn/nspawn-start.sh" "${entry%%:*}" "$rootfs" \
      --volatile=overlay --network-bridge="$bridge" --bind-ro="$PWD/$key.pub:/root/.ssh/authorized_keys" \
      --system-call-filter=bpf
  done
  for entry in "${machines[@]}"; do
    for _ in $(seq 1 100); do
      # shellcheck disable=SC2086
      ssh $ssh_opts -o BatchMode=yes -o ConnectTimeout=2 "root@${entry#*:}" true 2>/dev/null && break
      sleep 0.3
    done
  done
  local start=$SECONDS
  ansible-playbook "${inventory[@]}" playbooks/lab.yml
  echo "site.yml on the lab took $((SECONDS - start)) s"
  cat <<INFO

Lab fleet is up: hub 10.231.12.10 (hub, UI, Prometheus, agents), web1 10.231.12.11, db1 10.231.12.12$(
  [ "${CLUSTER:-0}" = 0 ] || echo "; a hub cluster: NATS + hub on hub, hub2 10.231.12.13, hub3 10.231.12.14 (hub: the indexer)").
  UI (127.0.0.1:8080 inside hub) and Prometheus (9090 on hub), through an SSH tunnel:
      ssh $ssh_opts -N -L 8080:127.0.0.1:8080 -L 9090:127.0.0.1:9090 root@10.231.12.10
      then open http://127.0.0.1:8080/ (UI) and http://127.0.0.1:9090/targets (Prometheus)
  Units on a machine:
      scripts/nspawn/nspawn-run.sh hub systemctl status 'amoskys-*'
      ssh $ssh_opts root@10.231.12.11 systemctl status 'amoskys-*'
  Fleet and events from the hub:
      scripts/nspawn/nspawn-run.sh hub /opt/amoskys/venv/bin/amoskys status
      scripts/nspawn/nspawn-run.sh hub /opt/amoskys/venv/bin/amoskys query --since 15m --kind auth
  Remove it: make lab-down
INFO
}

quiet() {
  local since=${1:-$(date -u +%Y-%m-%dT%H:%M:%S)} logins=20
  for entry in "${machines[@]}"; do   # the machines side by side, each one's logins one after another
    for _ in $(seq "$logins"); do
      # shellcheck disable=SC2086
      ssh $ssh_opts -o BatchMode=yes "root@${entry#*:}" true
    done &
  done
  wait
  echo "$logins SSH logins to each of ${machines[*]%%:*}; alerts stored since $since UTC:"
  sleep 3   # the logins' process and auth events on their way to the hub
  # shellcheck disable=SC2086
  ssh $ssh_opts -o BatchMode=yes "root@${machines[0]#*:}" python3 - "$since" "${machines[@]%%:*}" <<'PY'
import collections, json, subprocess, sys
since, hosts = sys.argv[1], sys.argv[2:]
out = subprocess.run(["/opt/amoskys/venv/bin/amoskys", "query", "--json", "--kind", "alert", "--since", since,
                      "--limit", "1000"], capture_output=True, text=True, check=True).stdout
alerts = [json.loads(line)["event"] for line in out.splitlines()]
for host in sorted(set(hosts) | {a["host"] for a in alerts}):
    rules = collections.Counter(a["alert"]["rule"] for a in alerts if a["host"] == host)
    print(f"  {host:<8} {sum(rules.values()):>4} alerts  " + ", ".join(f"{r} x{n}" for r, n in rules.most_common()))
sys.exit(1 if alerts else 0)
PY
}

down() {
  "$nspawn/nspawn-stop.sh" "${machines[@]%%:*}" "${cluster_machines[@]%%:*}"
  "$nspawn/net-down.sh" "$bridge" "$subnet"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  quiet) quiet "${2:-}" ;;
  *) echo "usage: $0 up|down|quiet [SINCE]" >&2; exit 2 ;;
esac
