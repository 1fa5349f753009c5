#!/usr/bin/env python3
"""proc on kernel process events: short-lived execs reported, idle CPU, RSS (agent and its reader).

    python benchmarks/proc.py                           # 10,000 execs of /bin/true at 500/s, as the unit runs
    python benchmarks/proc.py --no-realtime             # as on a host where the role found no real-time priority
    python benchmarks/proc.py --execs 2000 --rate 200 --idle-seconds 10

Everything runs for real and as root (as the unit does: CAP_NET_ADMIN, nice -10, started at SCHED_FIFO 1
by its real-time drop-in): `amoskys eventbus` and `amoskys agent proc` as separate processes over
loopback mTLS. A spawner process starts the execs at a steady rate (posix_spawn, each reaped at
once: /bin/true lives about a millisecond) and writes their pids; the hub's store then says which
were reported, with what.
Figures: the share of execs reported (a START event for the pid), with their name, and with exe
and command line (read from /proc before the process exited); how soon after each exec the reader
had read them (its histogram); the agent's `gone`/`missing`/`lost` counters; idle CPU of agent and
reader with the connector running (in 10-s windows, against the machine's own exec rate), and of
the agent alone while no event reaches it (the reader stopped, last: as on a host where nothing
starts); RSS of each and their PSS together; the seconds from a
suspicious act (a program run from /tmp, a running program's file deleted) to its alert stored at
the hub; the load (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from amoskys import pki
from amoskys.v1 import events_pb2

sys.path.insert(0, str(Path(__file__).parent))
from hub import proc_stats, start_hub

from agents import write_agent_config

Action = events_pb2.ProcessEvent.Action
SPAWNER = """
import os, sys, time
count, rate, program = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
pids, start = [], time.monotonic()
for i in range(count):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    pid = os.posix_spawn(program, [program], {})
    os.waitpid(pid, 0)
    pids.append(pid)
print(" ".join(map(str, pids)))
"""


def started_in_store(work: Path, agent_id: str) -> dict[int, events_pb2.ProcessEvent]:
    """pid -> the START event the hub stored for it (the last one, should a pid repeat)."""
    starts: dict[int, events_pb2.ProcessEvent] = {}
    with sqlite3.connect(f"file:{work / 'store' / 'events.db'}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT body FROM events WHERE agent_id = ? AND kind = 'process'", (agent_id,))
        for (body,) in rows:
            process = events_pb2.Event.FromString(body).process
            if process.action == Action.START:
                starts[process.pid] = process
    return starts


def alert_stored(work: Path, pid: int, timeout: float = 30.0) -> tuple[str, int] | None:
    """(rule, received_ns) of the first alert about `pid` the hub stored, waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{work / 'store' / 'events.db'}?mode=ro", uri=True, timeout=30) as conn:
            rows = conn.execute("SELECT body, received_ns FROM events WHERE kind = 'alert' ORDER BY id").fetchall()
        for body, received_ns in rows:
            alert = events_pb2.Event.FromString(body).alert
            if alert.details.get("pid") == str(pid):
                return alert.rule, received_ns
        time.sleep(0.05)
    return None


def alert_latencies(work: Path) -> dict[str, Any]:
    """Seconds from a suspicious act to its alert stored at the hub: a program run from /tmp, and a
    running program's executable deleted (found by the recheck)."""
    results: dict[str, Any] = {}
    sleep = shutil.which("sleep") or "/bin/sleep"
    for case, directory in (("exe_in_writable_dir", "/tmp"), ("exe_deleted", str(Path.home()))):
        folder = Path(tempfile.mkdtemp(prefix="amoskys-bench-", dir=directory))
        program = folder / "payload"
        shutil.copy2(sleep, program)  # its mtime kept: not a new binary
        child = subprocess.Popen([str(program), "60"])
        try:
            acted_ns = time.time_ns()
            if case == "exe_deleted":
                time.sleep(0.5)  # started, then its file deleted (a dropper cleaning up)
                program.unlink()
                acted_ns = time.time_ns()
            found = alert_stored(work, child.pid)
            results[case] = {"rule": found[0], "seconds": round((found[1] - acted_ns) / 1e9, 3)} if found else None
        finally:
            child.kill()
            child.wait()
            shutil.rmtree(folder, ignore_errors=True)
    return results


def agent_metrics(port: int) -> dict[str, float]:
    """amoskys_agent_proc_* samples: name (with its labels, if any, as name{label="value"}) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(r"^(amoskys_agent_proc_\w+?)(?:_total)?(\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    return {name + labels: float(value) for name, labels, value in found}


def read_delays(metrics: dict[str, float]) -> dict[str, float]:
    """The share of execs whose command line and executable were read within each bucket (exec -> read)."""
    prefix = "amoskys_agent_proc_read_delay_seconds_bucket"
    buckets = {key.split('le="')[1].rstrip('"}'): value for key, value in metrics.items() if key.startswith(prefix)}
    total = buckets.get("+Inf", 0) or 1
    return {f"<= {le} s": round(100 * count / total, 2) for le, count in buckets.items() if le != "+Inf"}


def reader_of(agent_pid: int) -> int:
    """The agent's reader process (its only child)."""
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        children = (task / "children").read_text().split()
        if children:
            return int(children[0])
    raise SystemExit("the agent has no reader process (polling?)")


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def both_stats(agent_pid: int, reader_pid: int) -> dict[str, float]:
    """CPU seconds of agent and reader together; RSS and PSS of each (MB)."""
    agent, reader = proc_stats(agent_pid), proc_stats(reader_pid)
    return {
        "cpu_s": agent["cpu_s"] + reader["cpu_s"], "reader_cpu_s": reader["cpu_s"],
        "rss_mb": agent["rss_mb"], "peak_rss_mb": agent["peak_rss_mb"], "reader_rss_mb": reader["rss_mb"],
        "pss_mb": pss_mb(agent_pid) + pss_mb(reader_pid),
    }  # fmt: skip


def start_agent(
    work: Path, hub: subprocess.Popen[bytes], hub_port: int, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], int]:
    proc = {"realtime_share": args.realtime_share}
    config = write_agent_config(work, "proc", hub_port, metrics={"listen": "127.0.0.1:0"}, proc=proc)
    hub.send_signal(signal.SIGHUP)  # the hub learns the agent's key
    time.sleep(0.5)
    log_path = work / "agent-proc.log"
    policy = [] if args.no_realtime else ["chrt", "--fifo", "1"]  # the drop-in's CPUSchedulingPolicy=fifo
    agent = subprocess.Popen(
        ["nice", "-n", str(args.nice), *policy, sys.executable, "-m", "amoskys", "agent", "proc", "--config",
         str(config)],
        stderr=log_path.open("wb"),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"agent running"' in line:
                return agent, int(json.loads(line)["metrics_port"])
        time.sleep(0.1)
    agent.kill()
    raise SystemExit(f"agent did not start: {log_path.read_text()}")


def run_execs(count: int, rate: float, program: str, workers: int) -> tuple[list[int], float]:
    """`count` execs at `rate` per second in total, from `workers` spawner processes side by side."""
    started = time.monotonic()
    spawners = [
        subprocess.Popen(
            [sys.executable, "-c", SPAWNER, str(count // workers), str(rate / workers), program],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(workers)
    ]  # fmt: skip
    pids = [int(pid) for spawner in spawners for pid in spawner.communicate()[0].split()]
    return pids, len(pids) / (time.monotonic() - started)


IDLE_WINDOW_S = 10.0


def idle_windows(agent_pid: int, reader_pid: int, metrics_port: int, seconds: float) -> list[tuple[float, float]]:
    """(the machine's execs per second, CPU % of one core of agent and reader) in each window of the idle time."""

    def sample() -> tuple[float, float]:
        return both_stats(agent_pid, reader_pid)["cpu_s"], agent_metrics(metrics_port)["amoskys_agent_proc_execs"]

    windows = []
    cpu, execs = sample()
    for _ in range(max(1, round(seconds / IDLE_WINDOW_S))):
        time.sleep(IDLE_WINDOW_S)  # "idle": no load of ours; the machine's own execs go on
        cpu_now, execs_now = sample()
        windows.append(((execs_now - execs) / IDLE_WINDOW_S, 100 * (cpu_now - cpu) / IDLE_WINDOW_S))
        cpu, execs = cpu_now, execs_now
    return windows


def idle_fit(windows: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares over the windows: CPU % = at_zero + per_exec_s * execs per second (a host with no execs:
    at_zero). None when the machine's exec rate did not vary enough to tell the two apart."""
    n = len(windows)
    mean_x, mean_y = sum(x for x, _ in windows) / n, sum(y for _, y in windows) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in windows)
    if n < 3 or sxx < 1.0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in windows) / sxx
    return {"at_zero_execs_percent": round(mean_y - slope * mean_x, 2), "percent_per_exec_per_s": round(slope, 3)}


def agent_cpu_without_events(agent_pid: int, reader_pid: int, seconds: float) -> float:
    """The agent's CPU (% of one core) while no process event reaches it: its reader stopped (SIGSTOP),
    as on a host where nothing starts. The reader's own cost there is nil: it sleeps in poll()."""
    os.kill(reader_pid, signal.SIGSTOP)
    try:
        time.sleep(1)  # what the reader had sent is handled
        before = proc_stats(agent_pid)["cpu_s"]
        time.sleep(seconds)
        return round(100 * (proc_stats(agent_pid)["cpu_s"] - before) / seconds, 2)
    finally:
        os.kill(reader_pid, signal.SIGCONT)


def measure(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    hub, hub_port, _ = start_hub(work, work / "ids")
    agent, metrics_port = start_agent(work, hub, hub_port, args)
    try:
        time.sleep(5)  # the snapshot and its publishing settle
        reader = reader_of(agent.pid)
        before, execs_before = both_stats(agent.pid, reader), agent_metrics(metrics_port)["amoskys_agent_proc_execs"]
        windows = idle_windows(agent.pid, reader, metrics_port, args.idle_seconds)
        idle, execs_idle = both_stats(agent.pid, reader), agent_metrics(metrics_port)["amoskys_agent_proc_execs"]
        pids, achieved_rate = run_execs(args.execs, args.rate, args.program, args.workers)
        deadline = time.monotonic() + 120
        starts = started_in_store(work, "bench-proc")
        while time.monotonic() < deadline and not all(pid in starts for pid in pids):
            time.sleep(1)
            starts = started_in_store(work, "bench-proc")
        after = both_stats(agent.pid, reader)
        metrics = agent_metrics(metrics_port)
        latencies = alert_latencies(work)
        quiet_cpu_percent = agent_cpu_without_events(agent.pid, reader, args.quiet_seconds)
    finally:
        agent.terminate()
        agent.wait(30)
        hub.terminate()
        hub.wait(30)
    reported = [starts[pid] for pid in pids if pid in starts]
    share = lambda n: round(100 * n / len(pids), 2)  # noqa: E731
    missing = {key.split('"')[1]: value for key, value in metrics.items() if "_missing{" in key and value}
    return {
        "execs": len(pids),
        "program": args.program,
        "target_rate_per_s": args.rate,
        "achieved_rate_per_s": round(achieved_rate, 1),
        "reported_percent": share(len(reported)),
        "with_pid_ppid_percent": share(sum(bool(p.pid and p.ppid) for p in reported)),
        "with_name_percent": share(sum(bool(p.name) for p in reported)),
        "with_exe_and_cmdline_percent": share(sum(bool(p.exe and p.cmdline) for p in reported)),
        "gone_and_missing_named_percent": share(sum(p.gone and bool(p.missing) for p in reported)),
        "read_within_percent": read_delays(metrics),
        "started_realtime": not args.no_realtime,
        "realtime_share": args.realtime_share,
        "reader_realtime": metrics.get("amoskys_agent_proc_reader_realtime"),
        "throttled_counter": metrics.get("amoskys_agent_proc_throttled"),
        "gone_counter": metrics.get("amoskys_agent_proc_gone"),
        "missing_counters": missing,
        "lost_counter": metrics.get("amoskys_agent_proc_lost"),
        "mode_connector": metrics.get('amoskys_agent_proc_mode{mode="connector"}'),
        "idle_cpu_percent_of_one_core": round(100 * (idle["cpu_s"] - before["cpu_s"]) / args.idle_seconds, 2),
        "idle_cpu_percent_reader": round(100 * (idle["reader_cpu_s"] - before["reader_cpu_s"]) / args.idle_seconds, 2),
        "other_execs_per_s_while_idle": round((execs_idle - execs_before) / args.idle_seconds, 1),
        "idle_windows_execs_per_s_and_cpu_percent": [(round(x, 1), round(y, 2)) for x, y in windows],
        "idle_cpu_fit": idle_fit(windows),
        "agent_cpu_percent_without_events": quiet_cpu_percent,
        "rss_mb_idle": round(idle["rss_mb"], 1),
        "rss_mb_after_load": round(after["rss_mb"], 1),
        "peak_rss_mb": round(after["peak_rss_mb"], 1),
        "reader_rss_mb": round(after["reader_rss_mb"], 1),
        "pss_mb_agent_and_reader": round(after["pss_mb"], 1),
        "alert_stored_after": latencies,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execs", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0, help="execs per second")
    parser.add_argument("--program", default="/bin/true", help="what each exec runs (no arguments)")
    parser.add_argument("--workers", type=int, default=4, help="spawner processes sharing the rate")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--quiet-seconds", type=float, default=60.0, help="the agent with no events (reader stopped)")
    parser.add_argument(
        "--no-realtime", action="store_true",
        help="start the agent as a normal task, as its unit does where the role installed no real-time drop-in",
    )  # fmt: skip
    parser.add_argument("--realtime-share", type=float, default=0.5, help="proc.realtime_share")
    parser.add_argument("--nice", type=int, default=-10, help="the agent's and its reader's nice (the unit's Nice=)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the agent gets CAP_NET_ADMIN and nice -10 as its unit gives it")
    with tempfile.TemporaryDirectory(prefix="amoskys-proc-bench-") as tmp:
        work = Path(tmp)
        pki.init_ca(work / "ca")
        (work / "ids" / "trust").mkdir(parents=True)
        print(json.dumps(measure(work, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
