#!/bin/bash
# Usage: scripts/lab-partition.sh [SECONDS]   (make lab-partition; the lab must be up: make lab)
# Partitions web1 from the hub for SECONDS (default 120), heals, and checks with exact counts what the hub
# stored (issue 15: a silent partition is found in seconds and loses nothing):
#   - the partition: nft drop rules on the host's lab bridge (table bridge amx_lab_partition) for IPv4 between
#     the hub (10.231.12.10) and web1 (10.231.12.11), both ways; checked by TCP connects both ways (must fail).
#     In the cluster lab (make lab CLUSTER=1: hub2 10.231.12.13 and hub3 10.231.12.14 up) web1 is cut off from
#     all three hubs: with one left it would fail over to it (the cluster's own partition test is Molecule's);
#   - during it, MARKS (default 20) auth lines with a unique marker are logged on web1 (`logger`, a PAM
#     "session opened" line for user amxpart<run>-<i>: an auth event, no alert);
#   - every agent on web1 (its metrics ports: `amoskys agent --list --json` on web1) is scraped every 0.5 s from
#     inside web1: amoskys_agent_connected must go to 0 within DETECT_BOUND_S (default 30) of the partition's
#     start and back to 1 within RECOVER_BOUND_S (default 40) of the heal;
#   - after the heal, from the hub (`amoskys query --json` through scripts/nspawn/nspawn-run.sh): each marked
#     event stored exactly once within DELIVER_BOUND_S (default 60) of the heal; web1's agents' own events
#     timed during the partition stored, none twice (by event_id); no bus.chain_break / bus.fork /
#     bus.chain_reset alert for web1's agents since the partition's start.
# Prints a table of what it measured; exit 1 when something is missing, duplicated or slower than its bound.
# The drop rules are removed on every exit (the table is deleted; nothing else on the host is touched).
set -euo pipefail
cd "$(dirname "$0")/.."
run=scripts/nspawn/nspawn-run.sh
amoskys=/opt/amoskys/venv/bin/amoskys
partition_s=${1:-${PARTITION_S:-120}}
marks=${MARKS:-20}
# The bounds follow from the publisher (agents/runtime/publisher.py): a dead hub is found within a keepalive
# interval plus TCP_USER_TIMEOUT (12 + 10 s: 30 s allowed); after the heal an agent reconnects when its
# jittered reconnect backoff (capped at 30 s) ends, plus one connection attempt (40 s allowed).
detect_bound=${DETECT_BOUND_S:-30} recover_bound=${RECOVER_BOUND_S:-40} deliver_bound=${DELIVER_BOUND_S:-60}
hub_ip=10.231.12.10 web_ip=10.231.12.11 table=amx_lab_partition
hub_ips=("$hub_ip")   # every hub web1's agents may dial: the cluster lab's other hubs when they are up
for other in hub2:10.231.12.13 hub3:10.231.12.14; do
  "$run" "${other%%:*}" true 2>/dev/null && hub_ips+=("${other#*:}")
done
hub_set="{ $(IFS=,; echo "${hub_ips[*]}") }"
work=$(mktemp -d /tmp/lab-partition.XXXXXX)
watcher=

"$run" hub true 2>/dev/null && "$run" web1 true 2>/dev/null || { echo "the lab is not up: make lab" >&2; exit 2; }

heal() { nft delete table bridge "$table" 2>/dev/null || true; }
cleanup() {  # whatever fails here, the rest still runs
  set +e
  heal
  if [ -n "$watcher" ]; then "$run" web1 touch "$stop_file" 2>/dev/null; wait "$watcher" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT

partition() {
  nft -f - <<NFT
table bridge $table {
  chain forward {
    type filter hook forward priority -200; policy accept;
    ip saddr $hub_set ip daddr $web_ip drop
    ip saddr $web_ip ip daddr $hub_set drop
  }
}
NFT
}

# reaches FROM_MACHINE ADDRESS: a TCP connect to ADDRESS:22 from inside the machine succeeds within 3 s
reaches() { "$run" "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/22" 2>/dev/null; }

# Web1's agents and their metrics ports (the registry of agent kinds, as installed on web1); keep those
# that answer (the kinds enabled there).
mapfile -t kinds < <("$run" web1 "$amoskys" agent --list --json |
  python3 -c 'import json, sys; [print(k["name"], k["metrics_port"], sep=":") for k in json.load(sys.stdin)]')

# The watcher: scrapes amoskys_agent_connected of every kind every 0.5 s; prints "T_NS KIND VALUE" (VALUE -1
# when the port does not answer). It runs inside web1 (the partition does not cut it off from the agents),
# from 127.0.0.1: the agents' units let only localhost and the hub in (IPAddressAllow). It stops when
# STOP_FILE exists (cleanup makes it) or after MAX_S.
stop_file=/run/amx-lab-partition.$$.stop
max_s=$((partition_s + recover_bound + deliver_bound + 120))
"$run" web1 python3 -u - "$web_ip" "$stop_file" "$max_s" "${kinds[@]}" >"$work/connected" <<'PY' &
import http.client, os, sys, time
address, stop_file, max_s, kinds = sys.argv[1], sys.argv[2], float(sys.argv[3]), [k.split(":") for k in sys.argv[4:]]
end = time.monotonic() + max_s
while time.monotonic() < end and not os.path.exists(stop_file):
    for kind, port in kinds:
        value = -1.0
        try:
            conn = http.client.HTTPConnection(address, int(port), timeout=1, source_address=("127.0.0.1", 0))
            conn.request("GET", "/metrics")
            for line in conn.getresponse().read().decode().splitlines():
                if line.startswith("amoskys_agent_connected "):
                    value = float(line.split()[1])
            conn.close()
        except OSError:
            pass
        print(time.time_ns(), kind, int(value))
    time.sleep(0.5)
if os.path.exists(stop_file):
    os.remove(stop_file)
PY
watcher=$!

# first_at KIND VALUE AFTER_NS: the first time (ns) KIND's connected metric read VALUE at or after AFTER_NS
first_at() { awk -v k="$1" -v v="$2" -v t="$3" '$2 == k && $3 == v && $1 >= t {print $1; exit}' "$work/connected"; }
sleep_until() { sleep "$(awk -v t="$1" -v now="$(date +%s%N)" 'BEGIN{r = (t - now) / 1e9; printf "%.2f", (r > 0 ? r : 0)}')"; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", (b - a) / 1e9}'; }

sleep 2
mapfile -t agents < <(awk '$3 >= 0 {print $2}' "$work/connected" | sort -u)
[ "${#agents[@]}" -gt 0 ] || { echo "no agent metrics answer on $web_ip" >&2; exit 2; }
for kind in "${agents[@]}"; do
  [ "$(awk -v k="$kind" '$2 == k {v = $3} END {print v}' "$work/connected")" = 1 ] ||
    { echo "web1's $kind agent is not connected before the partition" >&2; exit 2; }
done
reaches web1 "$hub_ip" && reaches hub "$web_ip" || { echo "web1 and the hub do not reach each other" >&2; exit 2; }

marker="amxpart$(date +%s)"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "Partitioning web1 from the hub(s) ${hub_ips[*]} for ${partition_s} s (${marks} marked auth lines, marker ${marker};" \
  "agents: ${agents[*]}; load ${load_before})"
start_ns=$(date +%s%N)
partition
cut=yes
for ip in "${hub_ips[@]}"; do reaches web1 "$ip" && cut="NO: web1 reaches the hub at $ip"; done
reaches hub "$web_ip" && cut="NO: the hub reaches web1"
for i in $(seq "$marks"); do   # spread over the partition, at start + i/(MARKS+1) of it: the last well before the heal
  sleep_until "$((start_ns + i * partition_s * 1000000000 / (marks + 1)))"
  "$run" web1 logger -p authpriv.info -t amx-partition \
    "pam_unix(amx-partition:session): session opened for user $marker-$i"
done
marks_end_ns=$(date +%s%N)
sleep_until "$((start_ns + partition_s * 1000000000))"
heal_ns=$(date +%s%N)
heal
healed_s=$(seconds "$start_ns" "$heal_ns")
echo "Healed after $healed_s s, waiting for the agents and the hub"

# Recovery: until every agent reads 1 again after the heal (or its bound is over).
deadline=$((SECONDS + recover_bound + 5))
while [ $SECONDS -lt $deadline ]; do
  back=0
  for kind in "${agents[@]}"; do [ -n "$(first_at "$kind" 1 "$heal_ns")" ] && back=$((back + 1)); done
  [ "$back" = "${#agents[@]}" ] && break
  sleep 1
done

# The hub's view: marks (exactly once each), web1's own events in the partition (none twice), bus alerts.
hub_report=$("$run" hub python3 - "$amoskys" "$marker" "$marks" "$start_ns" "$heal_ns" "$deliver_bound" <<'PY'
import collections, datetime, json, subprocess, sys, time
amoskys, marker, marks, start_ns, heal_ns, bound = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), float(sys.argv[6])
MAX_PAGE = 1000  # the hub's largest page: a full page is split in two time ranges


def iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def query(since_s: int, until_s: int, *args: str) -> list[dict]:
    """Every stored event in [since_s, until_s) (whole seconds) matching args, splitting full pages."""
    out = subprocess.run([amoskys, "query", "--json", "--since", iso(since_s * 10**9), "--until",
                          iso(until_s * 10**9), "--limit", str(MAX_PAGE), *args],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    if len(rows) < MAX_PAGE:
        return rows
    if until_s - since_s <= 1:
        sys.exit(f"more than {MAX_PAGE} events in one second: cannot count them exactly")
    middle = (since_s + until_s) // 2
    return query(since_s, middle, *args) + query(middle, until_s, *args)


since_s, until_s = start_ns // 10**9 - 1, lambda: time.time_ns() // 10**9 + 2
deadline = heal_ns / 1e9 + bound
while True:  # the marks: until all are there or the bound is over
    rows = query(since_s, until_s(), "--host", "web1", "--kind", "auth")
    users = collections.Counter(u for r in rows if marker in (u := r["event"].get("auth", {}).get("user", "")))
    if len(users) >= marks or time.time() > deadline:
        break
    time.sleep(0.5)
last_ns = max((int(r["received_ns"]) for r in rows if marker in json.dumps(r["event"])), default=0)
print(f"marks|{sum(users.values())}|{len(users)}|{sum(1 for n in users.values() if n > 1)}|"
      f"{(last_ns - heal_ns) / 1e9:.1f}")
own = collections.defaultdict(list)
for r in query(since_s, until_s(), "--host", "web1"):
    if start_ns <= int(r["event"].get("ts_ns", 0)) < heal_ns and marker not in json.dumps(r["event"]):
        own[r["event"].get("agent", r["agent_id"])].append(r["event"]["event_id"])
for agent, ids in sorted(own.items()):
    print(f"own|{agent}|{len(ids)}|{len(ids) - len(set(ids))}")
alerts = [r["event"] for r in query(since_s, until_s(), "--kind", "alert")
          if r["event"]["alert"]["rule"].startswith("bus.")]
web1 = [a for a in alerts if a["host"] == "web1" or "web1" in json.dumps(a["alert"].get("details", {}))]
print(f"bus|{len(web1)}|" + ", ".join(f"{a['alert']['rule']}: {a['alert'].get('summary', '')}" for a in web1))
PY
) || { echo "the hub's query failed: $hub_report" >&2; exit 1; }
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

failed=0
row() { printf '%-40s %-12s %-10s %s\n' "$@"; }
check() {  # WHAT MEASURED BOUND OK(0|1) NOTE
  local verdict="FAIL${5:+: $5}"
  [ "$4" != 0 ] || verdict=ok
  row "$1" "$2" "$3" "$verdict"
  [ "$4" = 0 ] || failed=1
}
within() { awk -v s="$1" -v b="$2" 'BEGIN{exit !(s != "" && s <= b)}'; }
echo
row measured value bound result
check "partition (both ways cut)" "$cut" "yes" "$([ "$cut" = yes ] && echo 0 || echo 1)"
for kind in "${agents[@]}"; do
  down=$(first_at "$kind" 0 "$start_ns") up=
  [ -n "$down" ] && up=$(first_at "$kind" 1 "$heal_ns")
  detect=${down:+$(seconds "$start_ns" "$down")} recover=${up:+$(seconds "$heal_ns" "$up")}
  check "$kind: connected 1 -> 0 after the cut" "${detect:-never}s" "<= ${detect_bound}s" \
    "$(within "$detect" "$detect_bound"; echo $?)"
  check "$kind: connected 0 -> 1 after the heal" "${recover:-never}s" "<= ${recover_bound}s" \
    "$(within "$recover" "$recover_bound"; echo $?)"
done
IFS='|' read -r _ stored distinct twice delivered <<<"$(grep '^marks|' <<<"$hub_report")"
inside=$(awk -v e="$marks_end_ns" -v h="$heal_ns" 'BEGIN{print (e < h ? "yes" : "NO")}')
check "marks all written before the heal" "$inside" "yes" "$([ "$inside" = yes ] && echo 0 || echo 1)"
check "marked auth events stored" "$stored" "$marks" "$([ "$stored" = "$marks" ] && echo 0 || echo 1)"
check "marked auth events distinct" "$distinct" "$marks" "$([ "$distinct" = "$marks" ] && echo 0 || echo 1)"
check "marked auth events stored twice" "$twice" "0" "$([ "$twice" = 0 ] && echo 0 || echo 1)"
check "last mark stored, after the heal" "${delivered}s" "<= ${deliver_bound}s" \
  "$(within "$delivered" "$deliver_bound"; echo $?)"
while IFS='|' read -r _ agent count dups; do
  check "$agent: own events in the partition" "$count" "> 0" "$([ "$count" -gt 0 ] && echo 0 || echo 1)"
  check "$agent: of them stored twice" "$dups" "0" "$([ "$dups" = 0 ] && echo 0 || echo 1)"
done < <(grep '^own|' <<<"$hub_report")
IFS='|' read -r _ bus_alerts bus_text <<<"$(grep '^bus|' <<<"$hub_report")"
check "bus.* alerts for web1's agents" "$bus_alerts" "0" "$([ "$bus_alerts" = 0 ] && echo 0 || echo 1)" "$bus_text"
echo "load average before: ${load_before}; after: ${load_after}"
exit "$failed"
