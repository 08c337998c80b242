"""Benchmark nswrap on the simulated multihomed host of tests/lab.py (issue 7).

Measures, side by side in one run (variants alternate, medians and ratios are reported):

1. datapath: UDP request/response latency (p50, p99) and transaction rate with sockperf
   ping-pong from lab client c1 to 192.0.2.10, against the same sockperf server
   (a) under nswrap, (b) bound directly on the lab host, (c) behind the 2014 veth-loop recipe;
2. start-up + teardown of `nswrap --ports 53 -- true` against scripts/bench_handwritten.sh doing
   the same ip/sysctl/nft work, the time until the first datagram is answered, and how both grow
   with the number of uplinks (scripts/bench_lab.UplinkLab) and of published ports;
3. scale: N distinct client flows (one datagram each, raw sockets, scripts/bench_traffic.py) to a
   UDP echo server under nswrap and bound directly: loss, and conntrack memory per flow;
4. the wrapper's own RSS and CPU, idle and under load;
plus a start-up profile of nswrap (import times, cProfile of a real start).

Writes docs/bench/results.json, docs/bench/results.md (figures vs targets) and PNG charts.
Everything happens in throwaway namespaces; run it via scripts/bench (root).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import pstats
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402  (a dependency of nswrap, so in .venv)

from scripts.bench_lab import UplinkLab, recipe_2014  # noqa: E402
from tests.lab import Lab, LabError, missing_requirements, wait_until  # noqa: E402

NSWRAP = str(ROOT / ".venv" / "bin" / "nswrap")
HANDWRITTEN = str(ROOT / "scripts" / "bench_handwritten.sh")
TRAFFIC = [sys.executable, str(ROOT / "scripts" / "bench_traffic.py")]
OUT = ROOT / "docs" / "bench"
WIDE_MASK = "0xff000000"  # the default mask has 15 marks: too few for 16 uplinks
START_TIMEOUT = 20
STOP_AFTER_FLOWS_TIMEOUT = 180  # teardown with 100k conntrack entries in the table is slow
C1_TARGET = "192.0.2.10"  # c1 -> r1 -> host eth0
C3_TARGET = "203.0.113.65"  # c3 -- host eth2, same subnet
C3_EXTRA = "203.0.113.67"  # second source address for the scale test (>64k flows)
LAB_UPLINKS = [("eth0", "192.0.2.10", "192.0.2.1"), ("eth1", "198.51.100.10", "198.51.100.1")]


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int  # datapath rounds (each runs every variant once, order rotated)
    pingpong_s: int  # sockperf run time per variant and round
    reps: int  # repetitions per start-up measurement and variant
    uplink_counts: tuple[int, ...]
    port_counts: tuple[int, ...]
    flows: int
    flows_deadline_s: float
    idle_s: float


QUICK = Settings(rounds=2, pingpong_s=1, reps=3, uplink_counts=(1, 16), port_counts=(1, 100),
                 flows=10_000, flows_deadline_s=20, idle_s=2)
FULL = Settings(rounds=7, pingpong_s=3, reps=9, uplink_counts=(1, 2, 4, 8, 12, 16),
                port_counts=(1, 10, 25, 50, 100), flows=100_000, flows_deadline_s=120, idle_s=5)


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


# --- processes ----------------------------------------------------------------------------------


def wait_line(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """Read *proc*'s stdout until a line matches *pattern* (bounded by *timeout*).

    *proc* must be spawned with ``stdout=PIPE, bufsize=0`` (binary, unbuffered): with a buffered
    reader, select() would not see lines already sitting in Python's buffer.
    """
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().decode(errors="replace")
            if regex.search(line):
                return line
            if not line:  # end of output
                proc.wait(5)
                raise LabError(f"{proc.args!r} exited with {proc.returncode} before printing {pattern!r}")
    raise TimeoutError(f"{proc.args!r}: no line matching {pattern!r} within {timeout}s")


def start_sockperf_server(lab: Lab, argv_prefix: list[str], address: str, port: int) -> subprocess.Popen:
    argv = [*PIN, *argv_prefix, "stdbuf", "-oL", "sockperf", "server", "-i", address, "-p", str(port)]
    proc = lab.spawn(lab.host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL, bufsize=0)
    wait_line(proc, r"to block on socket", START_TIMEOUT)  # printed once it is bound
    return proc


def stop(lab: Lab, proc: subprocess.Popen, timeout: float = 15) -> None:
    lab.stop(proc, sig=signal.SIGTERM, timeout=timeout)
    if proc.stdout:
        proc.stdout.close()


@dataclasses.dataclass
class Usage:
    """The wrapper's own footprint: the nswrap process and any helper it forked (not the server)."""

    rss_mb: float
    helper_rss_mb: float
    helpers: list[str]
    cpu_s: float

    @classmethod
    def of(cls, pid: int, server_name: str) -> Usage:
        me = psutil.Process(pid)
        helpers = [p for p in me.children(recursive=True) if server_name not in p.name()]
        cpu = sum(t.user + t.system for t in (p.cpu_times() for p in [me, *helpers]))
        return cls(me.memory_info().rss / 2**20, sum(h.memory_info().rss for h in helpers) / 2**20,
                   [h.name() for h in helpers], cpu)


# --- 1. datapath --------------------------------------------------------------------------------

PORTS = {"nswrap": 11001, "direct": 11002, "recipe2014": 11003}
# Client and server share one CPU: every round trip then costs only CPU work (no cross-CPU
# wake-ups, whose latency varies by tens of microseconds on a VM), so the extra work of each
# datapath shows up instead of scheduler noise.
PIN = ["taskset", "-c", "1"]


@contextlib.contextmanager
def datapath_server(lab: Lab, variant: str):
    port = PORTS[variant]
    if variant == "nswrap":
        proc = start_sockperf_server(lab, [NSWRAP, "--ports", str(port), "--"], "0.0.0.0", port)
    elif variant == "direct":
        proc = start_sockperf_server(lab, [], "0.0.0.0", port)
    else:
        recipe = recipe_2014(lab, port, LAB_UPLINKS)
        address = recipe.__enter__()
        try:
            proc = start_sockperf_server(lab, [], address, port)
        except BaseException:
            recipe.__exit__(*sys.exc_info())
            raise
    try:
        yield proc, port
    finally:
        stop(lab, proc)
        if variant == "recipe2014":
            recipe.__exit__(None, None, None)


def pingpong(lab: Lab, port: int, seconds: int) -> dict:
    res = lab.exec(lab.ns("c1"), [*PIN, "sockperf", "ping-pong", "-i", C1_TARGET, "-p", port, "-t", seconds,
                                  "--full-rtt", "-m", 64], timeout=seconds + 30)
    out = res.stdout + res.stderr
    valid = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)", out)
    pct = {float(p): float(v) for p, v in re.findall(r"percentile (\d+\.\d+) =\s*([\d.]+)", out)}
    if not valid or not pct:
        raise LabError(f"cannot parse sockperf output:\n{out[-2000:]}")
    runtime, sent, received = float(valid[1]), int(valid[2]), int(valid[3])
    return {"p50_us": pct[50.0], "p99_us": pct[99.0], "p99_9_us": pct[99.9],
            "transactions_per_s": round(received / runtime), "sent": sent, "received": received}


def bench_datapath(lab: Lab, s: Settings) -> dict:
    variants = list(PORTS)
    runs = {v: [] for v in variants}
    wrapper = {}
    for r in range(s.rounds):
        order = variants[r % 3:] + variants[:r % 3]
        for variant in order:
            with datapath_server(lab, variant) as (proc, port):
                if variant == "nswrap" and "idle" not in wrapper:
                    before = Usage.of(proc.pid, "sockperf")
                    time.sleep(s.idle_s)  # the measurement window itself, not a readiness wait
                    after = Usage.of(proc.pid, "sockperf")
                    wrapper["idle"] = {"seconds": s.idle_s, "cpu_percent": 100 * (after.cpu_s - before.cpu_s) / s.idle_s,
                                       **dataclasses.asdict(after)}
                t0, before = time.monotonic(), Usage.of(proc.pid, "sockperf") if variant == "nswrap" else None
                result = pingpong(lab, port, s.pingpong_s)
                if before:
                    after = Usage.of(proc.pid, "sockperf")
                    wall = time.monotonic() - t0
                    wrapper.setdefault("load", []).append(
                        {"seconds": round(wall, 2), "cpu_percent": 100 * (after.cpu_s - before.cpu_s) / wall,
                         **dataclasses.asdict(after)})
            runs[variant].append(result)
            say(f"datapath round {r + 1}/{s.rounds} {variant}: p50 {result['p50_us']:.1f} us, "
                f"{result['transactions_per_s']} tx/s")
    summary = {v: {k: median([x[k] for x in runs[v]]) for k in ("p50_us", "p99_us", "p99_9_us", "transactions_per_s")}
               for v in variants}
    direct = summary["direct"]
    ratios = {v: {"p50": summary[v]["p50_us"] / direct["p50_us"], "p99": summary[v]["p99_us"] / direct["p99_us"],
                  "transactions": summary[v]["transactions_per_s"] / direct["transactions_per_s"]}
              for v in variants}
    return {"runs": runs, "median": summary, "ratio_to_direct": ratios, "wrapper": wrapper}


# --- 2. start-up --------------------------------------------------------------------------------


def run_once(lab: Lab, argv: list[str]) -> float:
    t0 = time.monotonic()
    lab.exec(lab.host, argv, timeout=60)
    return time.monotonic() - t0


def startup_pair(lab: Lab, reps: int, ports: str, mask: str | None = None) -> dict:
    """Median wall time (ms) of `nswrap ... -- true` and of the hand-written script, alternated."""
    mask_nswrap = ["--mark-mask", mask] if mask else []
    mask_hand = ["-m", mask] if mask else []
    argv = {"nswrap": [NSWRAP, *mask_nswrap, "--ports", ports, "--", "true"],
            "handwritten": ["bash", HANDWRITTEN, *mask_hand, ports, "--", "true"]}
    times = {k: [] for k in argv}
    for i in range(reps):
        for k in (list(argv) if i % 2 == 0 else list(argv)[::-1]):
            times[k].append(run_once(lab, argv[k]) * 1000)
    return {k: {"median_ms": median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def first_answer(lab: Lab, reps: int) -> dict:
    """ms from spawning the wrapper until c1's first datagram is answered by a socat echo server."""
    port = 7000
    echo = ["socat", f"UDP4-RECVFROM:{port},fork", "PIPE"]
    argv = {"nswrap": [NSWRAP, "--ports", str(port), "--", *echo],
            "handwritten": ["bash", HANDWRITTEN, str(port), "--", *echo]}
    times = {k: [] for k in argv}
    for i in range(reps):
        for k in (list(argv) if i % 2 == 0 else list(argv)[::-1]):
            probe = lab.spawn(lab.ns("c1"), [*TRAFFIC, "probe", C1_TARGET, port, START_TIMEOUT],
                              stdout=subprocess.PIPE, bufsize=0)
            wait_line(probe, "ready", START_TIMEOUT)
            t0 = time.monotonic()
            server = lab.spawn(lab.host, argv[k], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                answered = float(wait_line(probe, r"^\d", START_TIMEOUT + 5))
                times[k].append((answered - t0) * 1000)
            finally:
                stop(lab, probe)
                stop(lab, server)
    return {k: {"median_ms": median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def slope(xs, ys) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def bench_startup(lab: Lab, s: Settings) -> dict:
    say("start-up: 3 uplinks (lab)")
    out = {"lab_3_uplinks": startup_pair(lab, s.reps, "53"), "first_answer": first_answer(lab, s.reps)}
    series = {}
    for n in s.uplink_counts:
        say(f"start-up: {n} uplink(s)")
        with UplinkLab(n) as ulab:
            series[n] = startup_pair(ulab, s.reps, "53", WIDE_MASK)
    out["by_uplinks"] = series
    ports = {}
    with UplinkLab(3) as ulab:
        for k in s.port_counts:
            say(f"start-up: {k} published port(s)")
            spec = ",".join(str(20000 + 2 * i) for i in range(k))  # not adjacent: k set elements
            ports[k] = startup_pair(ulab, s.reps, spec)
    out["by_ports"] = ports
    ns = list(series)
    out["ms_per_uplink"] = {k: slope(ns, [series[n][k]["median_ms"] for n in ns]) for k in ("nswrap", "handwritten")}
    ks = list(ports)
    out["ms_per_port"] = {k: slope(ks, [ports[n][k]["median_ms"] for n in ks]) for k in ("nswrap", "handwritten")}
    lab3 = out["lab_3_uplinks"]
    out["ratio_nswrap_to_handwritten"] = lab3["nswrap"]["median_ms"] / lab3["handwritten"]["median_ms"]
    return out


# --- 3. scale -----------------------------------------------------------------------------------


def conntrack_slab() -> dict:
    """The nf_conntrack slab cache (global: all namespaces of this machine) and total slab memory."""
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith("nf_conntrack "):
                fields = line.split()
                active, objsize = int(fields[1]), int(fields[3])
                break
        else:
            active = objsize = 0
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return {"active_objs": active, "objsize": objsize, "slab_kb": meminfo["Slab"]}


def conntrack_count(lab: Lab) -> int:
    res = lab.exec(lab.host, ["conntrack", "-C"], check=False)
    return int(res.stdout.strip() or 0) if res.returncode == 0 else 0


def bench_scale(lab: Lab, s: Settings) -> dict:
    c3 = lab.ns("c3")
    lab.exec(c3, ["ip", "addr", "add", f"{C3_EXTRA}/26", "dev", "eth0"])
    # The raw-socket client has no socket for the replies: keep its kernel from answering
    # each one with a port unreachable (a filter-only table does not enable conntrack here).
    lab.exec(c3, ["nft", "add table ip bench; add chain ip bench out { type filter hook output priority 0; };"
                  " add rule ip bench out icmp type destination-unreachable drop"])
    port, out = 7100, {}
    for i, variant in enumerate(("direct", "nswrap")):
        first_port = 10000 + 5000 * i  # fresh source ports per variant: no entry left from before
        echo = [*TRAFFIC, "echo", port]
        argv = [NSWRAP, "--ports", str(port), "--", *echo] if variant == "nswrap" else echo
        server = lab.spawn(lab.host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: lab.exec(c3, [*TRAFFIC, "probe", C3_TARGET, port, 1], check=False).returncode == 0,
                       START_TIMEOUT, what=f"{variant} echo server did not answer")
            ct_before, slab_before = conntrack_count(lab), conntrack_slab()
            cpu_before = Usage.of(server.pid, "python") if variant == "nswrap" else None
            res = lab.exec(c3, [*TRAFFIC, "flows", C3_TARGET, port, f"203.0.113.66,{C3_EXTRA}", first_port,
                                s.flows, s.flows_deadline_s], timeout=s.flows_deadline_s + 30)
            result = json.loads(res.stdout)
            ct_after, slab_after = conntrack_count(lab), conntrack_slab()
            if cpu_before:
                after = Usage.of(server.pid, "python")
                result["wrapper_cpu_percent"] = 100 * (after.cpu_s - cpu_before.cpu_s) / result["seconds"]
                result["wrapper_rss_mb"] = after.rss_mb
        finally:
            t0 = time.monotonic()
            stop(lab, server, timeout=STOP_AFTER_FLOWS_TIMEOUT)
            stopped = time.monotonic() - t0
        result["stop_seconds"] = round(stopped, 2)  # SIGTERM until gone, teardown included
        entries = ct_after - ct_before
        result["conntrack_entries_added"] = entries
        result["slab"] = {"before": slab_before, "after": slab_after}
        if entries > 1000:
            objs = slab_after["active_objs"] - slab_before["active_objs"]
            result["bytes_per_flow_nf_conntrack_slab"] = objs * slab_after["objsize"] / entries
            result["bytes_per_flow_all_slab"] = (slab_after["slab_kb"] - slab_before["slab_kb"]) * 1024 / entries
        result["loss_percent"] = 100 * result["lost"] / max(result["sent"], 1)
        out[variant] = result
        say(f"scale {variant}: {result['answered']}/{result['sent']} answered in {result['seconds']} s, "
            f"{entries} conntrack entries, stopped in {result['stop_seconds']} s")
    return out


# --- profile ------------------------------------------------------------------------------------


def bench_profile(lab: Lab, tmp: pathlib.Path, reps: int) -> dict:
    py = str(ROOT / ".venv" / "bin" / "python")

    def wall(argv) -> float:
        times = []
        for _ in range(reps):
            t0 = time.monotonic()
            subprocess.run(argv, capture_output=True, check=True, timeout=60)
            times.append((time.monotonic() - t0) * 1000)
        return median(times)

    # What a real start imports (--help alone does not import the run path).
    res = subprocess.run([py, "-X", "importtime", "-c", "import nswrap.cli, nswrap.run"],
                         capture_output=True, text=True, timeout=60)
    imports = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            imports.append({"module": m[4], "self_ms": int(m[1]) / 1000, "cumulative_ms": int(m[2]) / 1000,
                            "depth": len(m[3])})
    top_level = sorted((i for i in imports if i["depth"] <= 2), key=lambda i: -i["cumulative_ms"])[:15]
    prof = tmp / "start.prof"
    lab.exec(lab.host, [py, "-m", "cProfile", "-o", prof, "-m", "nswrap", "--ports", "53", "--", "true"], timeout=60)
    stats = pstats.Stats(str(prof))

    def top(key: str, n: int = 15) -> list[dict]:
        rows = sorted(stats.stats.items(), key=lambda kv: -(kv[1][3] if key == "cumulative" else kv[1][2]))
        return [{"function": f"{pathlib.Path(f).name}:{line}({name})", "calls": nc,
                 "tottime_ms": round(tt * 1000, 2), "cumtime_ms": round(ct * 1000, 2)}
                for (f, line, name), (cc, nc, tt, ct, _) in rows[:n]]

    return {
        "python_startup_ms": wall([py, "-c", "pass"]),
        "nswrap_help_ms": wall([py, "-m", "nswrap", "--help"]),
        "imports_total_ms": sum(i["self_ms"] for i in imports),
        "top_imports": top_level,
        "cprofile_total_ms": round(stats.total_tt * 1000, 1),
        "cprofile_top_cumulative": top("cumulative", 25),
        "cprofile_top_self": top("self", 15),
    }


# --- report -------------------------------------------------------------------------------------


def targets(r: dict) -> list[dict]:
    dp, st, sc = r["datapath"], r["startup"], r["scale"]
    idle = dp["wrapper"]["idle"]
    load = dp["wrapper"]["load"]
    rss = max(x["rss_mb"] + x["helper_rss_mb"] for x in [idle, *load])
    rows = [
        ("datapath latency p50, nswrap / direct", dp["ratio_to_direct"]["nswrap"]["p50"], "<= 1.10", lambda v: v <= 1.10, "{:.3f}"),
        ("transaction rate, nswrap / direct", dp["ratio_to_direct"]["nswrap"]["transactions"], ">= 0.90", lambda v: v >= 0.90, "{:.3f}"),
        ("start-up + teardown, nswrap / hand-written (3 uplinks)", st["ratio_nswrap_to_handwritten"], "<= 1.5", lambda v: v <= 1.5, "{:.2f}"),
        ("start-up + teardown per extra uplink (ms, nswrap)", st["ms_per_uplink"]["nswrap"], "<= 5", lambda v: v <= 5, "{:.2f}"),
        ("wrapper RSS incl. helpers (MB)", rss, "<= 40", lambda v: v <= 40, "{:.1f}"),
        ("wrapper CPU while idle (%)", idle["cpu_percent"], "~0 (<= 0.1)", lambda v: v <= 0.1, "{:.3f}"),
        ("scale: loss under nswrap (%)", sc["nswrap"]["loss_percent"], f"= direct ({sc['direct']['loss_percent']:.3f})",
         lambda v: v <= sc["direct"]["loss_percent"] + 0.01, "{:.3f}"),
    ]
    return [{"figure": name, "measured": fmt.format(v), "target": target, "met": bool(ok(v))}
            for name, v, target, ok, fmt in rows]


def markdown(r: dict) -> str:
    dp, st, sc, pr = r["datapath"], r["startup"], r["scale"], r["profile"]
    lines = [f"# nswrap benchmark results ({r['meta']['mode']} mode, {r['meta']['date']})", "",
             f"Kernel {r['meta']['kernel']}, {r['meta']['cpus']} CPUs. Generated by `scripts/bench`.", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {t['figure']} | {t['measured']} | {t['target']} | {'yes' if t['met'] else '**MISS**'} |" for t in r["targets"]]
    lines += ["", "## Datapath (sockperf ping-pong, 64 B, full round trip, medians of rounds)", "",
              "| variant | p50 µs | p99 µs | p99.9 µs | transactions/s | p50 vs direct | tx/s vs direct |",
              "|---|---|---|---|---|---|---|"]
    for v, m in dp["median"].items():
        q = dp["ratio_to_direct"][v]
        lines.append(f"| {v} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['p99_9_us']:.1f} | "
                     f"{m['transactions_per_s']:.0f} | {q['p50']:.3f} | {q['transactions']:.3f} |")
    lines += ["", "## Start-up + teardown (`-- true`, median ms)", "", "| case | nswrap | hand-written | ratio |", "|---|---|---|---|"]

    def row(name, pair):
        a, b = pair["nswrap"]["median_ms"], pair["handwritten"]["median_ms"]
        return f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f} |"

    lines.append(row("lab, 3 uplinks, 1 port", st["lab_3_uplinks"]))
    lines.append(row("first datagram answered (socat echo)", st["first_answer"]))
    lines += [row(f"{n} uplink(s)", p) for n, p in st["by_uplinks"].items()]
    lines += [row(f"{k} port(s), 3 uplinks", p) for k, p in st["by_ports"].items()]
    lines += ["", f"Slope: nswrap {st['ms_per_uplink']['nswrap']:.2f} ms/uplink, hand-written "
              f"{st['ms_per_uplink']['handwritten']:.2f} ms/uplink; nswrap {st['ms_per_port']['nswrap']:.3f} ms/port, "
              f"hand-written {st['ms_per_port']['handwritten']:.3f} ms/port.", "",
              "## Scale (distinct flows, one datagram each)", "",
              "| variant | flows sent | answered | loss % | flows/s | conntrack entries | B/flow (nf_conntrack slab) | B/flow (all slab) | stop s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v, x in sc.items():
        lines.append(f"| {v} | {x['sent']} | {x['answered']} | {x['loss_percent']:.3f} | {x['flows_per_second']} | "
                     f"{x['conntrack_entries_added']} | {x.get('bytes_per_flow_nf_conntrack_slab', 0):.0f} | "
                     f"{x.get('bytes_per_flow_all_slab', 0):.0f} | {x['stop_seconds']} |")
    w = dp["wrapper"]
    lines += ["", "## Wrapper footprint", "",
              f"Idle ({w['idle']['seconds']} s): RSS {w['idle']['rss_mb']:.1f} MB, helpers {w['idle']['helpers'] or 'none'}, "
              f"CPU {w['idle']['cpu_percent']:.3f} %. Under sockperf load: CPU "
              f"{max(x['cpu_percent'] for x in w['load']):.3f} % (max of rounds); under the scale test: "
              f"{sc['nswrap'].get('wrapper_cpu_percent', 0):.3f} %.", "",
              "## Start-up profile", "",
              f"python -c pass: {pr['python_startup_ms']:.0f} ms; nswrap --help: {pr['nswrap_help_ms']:.0f} ms; "
              f"imports of the start path (-X importtime, sum of self): {pr['imports_total_ms']:.0f} ms; cProfile of a real start "
              f"(`--ports 53 -- true`, lab host): {pr['cprofile_total_ms']:.0f} ms (profiled).", "",
              "| import | cumulative ms |", "|---|---|"]
    lines += [f"| {i['module']} | {i['cumulative_ms']:.1f} |" for i in pr["top_imports"][:12]]
    lines += ["", "| function (cProfile, by cumulative) | calls | cumulative ms | self ms |", "|---|---|---|---|"]
    lines += [f"| `{f['function']}` | {f['calls']} | {f['cumtime_ms']} | {f['tottime_ms']} |" for f in pr["cprofile_top_cumulative"][:20]]
    return "\n".join(lines) + "\n"


def charts(r: dict, out: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = r["datapath"]
    variants = list(dp["median"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    width = 0.38
    for j, (key, label) in enumerate((("p50_us", "p50"), ("p99_us", "p99"))):
        xs = [i + (j - 0.5) * width for i in range(len(variants))]
        meds = [dp["median"][v][key] for v in variants]
        lo = [meds[i] - min(x[key] for x in dp["runs"][v]) for i, v in enumerate(variants)]
        hi = [max(x[key] for x in dp["runs"][v]) - meds[i] for i, v in enumerate(variants)]
        bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=4, label=label)
        ax.bar_label(bars, fmt="%.0f", padding=3)
    ax.set_xticks(range(len(variants)), ["nswrap", "direct on host", "2014 veth-loop recipe"])
    ax.set_ylabel("UDP round trip (µs)")
    ax.set_title("sockperf ping-pong c1 → host (median of rounds, whiskers: min–max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    plt.close(fig)

    st = r["startup"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, data, xlabel in ((a1, st["by_uplinks"], "uplinks"), (a2, st["by_ports"], "published ports (3 uplinks)")):
        xs = list(data)
        for k, style in (("nswrap", "o-"), ("handwritten", "s--")):
            ax.plot(xs, [data[x][k]["median_ms"] for x in xs], style, label=k)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("start-up + teardown of `-- true` (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    a1.set_title("vs uplinks")
    a2.set_title("vs published ports")
    fig.tight_layout()
    fig.savefig(out / "startup.png")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and flows (under a minute)")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="results directory (default docs/bench)")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        say(f"cannot run: {reason}")
        return 1
    out = args.out.resolve()
    s = QUICK if args.quick else FULL
    started = time.monotonic()
    results = {"meta": {"mode": "quick" if args.quick else "full",
                        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "kernel": platform.release(), "cpus": os.cpu_count(), "settings": dataclasses.asdict(s),
                        "sockperf": subprocess.run(["sockperf", "--version"], capture_output=True, text=True).stdout.split("\n")[0]}}
    with tempfile.TemporaryDirectory(prefix="nswrap-bench-") as tmp:
        with Lab() as lab:
            results["datapath"] = bench_datapath(lab, s)
            results["startup"] = bench_startup(lab, s)
            say("scale")
            results["scale"] = bench_scale(lab, s)
            say("profile")
            results["profile"] = bench_profile(lab, pathlib.Path(tmp), s.reps)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    charts(results, out)
    print(markdown(results))
    say(f"done in {results['meta']['seconds']} s: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
