#!/bin/bash
# Usage: scripts/lab-attack.sh   (make lab-attack; the lab must be up: make lab)
# A short, safe attack on the lab fleet only (10.231.12.0/24), end to end: each step does something an
# attacker would, then waits for what the hub stored about it (`amoskys query --json` on the hub) and
# prints step -> alert -> seconds from the step's start to the hub storing it. Fails (exit 1) when an
# alert is missing or took more than 10 s. Everything it changes is undone (files, the borrowed address).
#   1. SSH brute force: web1 tries 6 logins as an unknown user on db1     -> auth.brute_force (db1)
#   2. web shell: a process named nginx on web1 starts sh, which runs id  -> proc.shell_from_web_daemon (web1)
#   3. dropper: a fresh binary in /dev/shm runs 3 s, deleted after 2.5 s   -> proc.exe_in_writable_dir (web1)
# Steps 2 and 3 last 3 s: the lab machines have network namespaces of their own, where the kernel refuses
# its process-event connector (init namespace only), so proc polls /proc every 2 s there (README, proc).
#   4. SNMP: web1 sends a linkDown trap (v2c) to the hub's trap receiver   -> snmp TRAP linkDown (hub), a warning
#   5. ARP spoof: db1 takes web1's address 10.231.12.11 as well           -> scanner.ip_conflict (hub)
set -euo pipefail
cd "$(dirname "$0")/.."
key=.lab/id_ed25519
ssh_opts=(-i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes
  -o ConnectTimeout=5)
declare -A ip=([hub]=10.231.12.10 [web1]=10.231.12.11 [db1]=10.231.12.12)
budget_s=10 wait_s=20   # an alert must be stored within budget_s; we look for it for wait_s
trap_community=$(awk -F': ' '/^amoskys_lab_snmp_trap_community:/{print $2}' inventories/lab/group_vars/amoskys_agents.yml)

on() { local host=$1; shift; ssh "${ssh_opts[@]}" "root@${ip[$host]}" "$@"; }

[ -f "$key" ] && on hub true 2>/dev/null || { echo "the lab is not up: make lab" >&2; exit 2; }

# On the hub: poll `amoskys query --json` until an event of KIND from HOST matching the Python
# expression MATCH (on `e`, the stored event as JSON) was received at or after START_NS; prints
# "SECONDS|SUMMARY" (seconds from START_NS to the hub's received_ns) or nothing.
wait_for() {
  local kind=$1 host=$2 match=$3 start_ns=$4
  on hub "python3 - '$kind' '$host' '$start_ns' '$wait_s' \"$match\"" <<'PY'
import datetime, json, subprocess, sys, time
kind, host, start_ns, wait_s, match = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
since = datetime.datetime.fromtimestamp(start_ns / 1e9 - 2, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
deadline = time.monotonic() + wait_s
while time.monotonic() < deadline:
    out = subprocess.run(["/opt/amoskys/venv/bin/amoskys", "query", "--json", "--since", since, "--kind", kind,
                          "--host", host, "--limit", "500"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        e = json.loads(line)
        if int(e.get("received_ns", 0)) >= start_ns and eval(match, {}, {"e": e["event"]}):
            body = e["event"].get("alert") or e["event"].get("snmp") or {}
            text = body.get("summary") or body.get("trap_oid", "")
            print(f"{(int(e['received_ns']) - start_ns) / 1e9:.1f}|{text[:70]}")
            sys.exit(0)
    time.sleep(0.5)
PY
}

results=() failed=0
step() {  # NAME WHAT KIND HOST MATCH COMMAND...: run COMMAND, then wait for the event
  local name=$1 what=$2 kind=$3 host=$4 match=$5; shift 5
  local start_ns found
  start_ns=$(date +%s%N)
  "$@" >/dev/null 2>&1 || true
  found=$(wait_for "$kind" "$host" "$match" "$start_ns")
  local seconds=${found%%|*} summary=${found#*|}
  if [ -z "$found" ]; then
    results+=("$(printf '%-14s %-32s %8s  %s' "$name" "$what" MISSING "nothing stored within ${wait_s} s")"); failed=1
  elif awk -v s="$seconds" -v b="$budget_s" 'BEGIN{exit !(s > b)}'; then
    results+=("$(printf '%-14s %-32s %7ss  TOO SLOW: %s' "$name" "$what" "$seconds" "$summary")"); failed=1
  else
    results+=("$(printf '%-14s %-32s %7ss  %s' "$name" "$what" "$seconds" "$summary")")
  fi
  echo "${results[-1]}"
}

alert_rule() { echo "e.get('alert', {}).get('rule') == '$1'"; }

brute_force() {
  on web1 'for i in 1 2 3 4 5 6; do
    ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=3 \
      lab-attacker@10.231.12.12 true; done'
}

web_shell() {  # a process whose name is nginx (prctl PR_SET_NAME) runs a shell, as a web shell would
  on web1 "python3 -c 'import ctypes, subprocess; ctypes.CDLL(None).prctl(15, b\"nginx\", 0, 0, 0); \
subprocess.run([\"sh\", \"-c\", \"id; sleep 3\"])'"
}

dropper() {  # a binary written a moment ago to world-writable /dev/shm, run, and gone
  on web1 'cp /bin/sleep /dev/shm/.lab-dropper && { /dev/shm/.lab-dropper 3 & sleep 2.5; rm -f /dev/shm/.lab-dropper; wait; }'
}

link_down_trap() {  # IF-MIB linkDown for ifIndex 7 (v2c), sent with the agents' pysnmp
  on web1 "/opt/amoskys/venv/bin/python - 10.231.12.10 '$trap_community'" <<'PY'
import asyncio, sys
from pysnmp.hlapi.v3arch.asyncio import (CommunityData, ContextData, NotificationType, ObjectIdentity, SnmpEngine,
                                         UdpTransportTarget, send_notification)
from pysnmp.proto.rfc1902 import Integer, OctetString

async def main(hub: str, community: str) -> None:
    engine = SnmpEngine()
    target = await UdpTransportTarget.create((hub, 162), timeout=1, retries=0)
    link_down = NotificationType(ObjectIdentity("1.3.6.1.6.3.1.1.5.3")).add_varbinds(
        ("1.3.6.1.2.1.2.2.1.1.7", Integer(7)), ("1.3.6.1.2.1.2.2.1.7.7", Integer(1)),
        ("1.3.6.1.2.1.2.2.1.8.7", Integer(2)), ("1.3.6.1.2.1.2.2.1.2.7", OctetString("lab-attack0")))
    error, *_ = await send_notification(engine, CommunityData(community, mpModel=1), target, ContextData(), "trap",
                                        link_down)
    engine.close_dispatcher()
    if error:
        sys.exit(f"trap not sent: {error}")

asyncio.run(main(sys.argv[1], sys.argv[2]))
PY
}

arp_spoof() { on db1 "ip addr add ${ip[web1]}/32 dev host0"; }

arp_spoof_undo() {  # give the address back; forget the spoofed neighbour entries
  on db1 "ip addr del ${ip[web1]}/32 dev host0" 2>/dev/null || true
  on hub 'ip neigh flush dev host0' 2>/dev/null || true
  ip neigh flush dev br-amx-lab 2>/dev/null || true
}
trap arp_spoof_undo EXIT

echo "Attacking the lab (each step waits up to ${wait_s} s for the hub; budget ${budget_s} s):"
printf '%-14s %-32s %8s  %s\n' step "expected at the hub" seconds "what the hub stored"
step brute-force "auth.brute_force on db1" alert db1 "$(alert_rule auth.brute_force)" brute_force
step web-shell "proc.shell_from_web_daemon web1" alert web1 "$(alert_rule proc.shell_from_web_daemon)" web_shell
step dropper "proc.exe_in_writable_dir web1" alert web1 "$(alert_rule proc.exe_in_writable_dir)" dropper
step snmp-trap "snmp linkDown trap on hub" snmp hub \
  "e.get('snmp', {}).get('trap_oid') == '1.3.6.1.6.3.1.1.5.3' and 'lab-attack0' in str(e['snmp'])" link_down_trap
step arp-spoof "scanner.ip_conflict on hub" alert hub "$(alert_rule scanner.ip_conflict)" arp_spoof
arp_spoof_undo
echo
if [ "$failed" = 0 ]; then echo "every step raised its alert within ${budget_s} s (see the UI's Alerts page)"; fi
exit "$failed"
