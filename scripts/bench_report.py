"""Reports of scripts/bench.py: docs/benchmarks.md, docs/bench/results.md and the charts, all
generated from one run's results (a dict, as saved in docs/bench/results.json).

    python scripts/bench_report.py [RESULTS_JSON [OUT_DIR]]   # re-render without re-measuring
    python scripts/bench_report.py --merge PARTIAL [--note TEXT] [RESULTS_JSON [OUT_DIR]]
        # put the sections of a `scripts/bench --only ...` run (PARTIAL, a JSON file) into
        # RESULTS_JSON in place of the same sections, then re-render; the others stay as they were
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAMES = {
    "direct": "server bound directly",
    "nswrap": "nswrap",
    "recipe2014": "2014 recipe",
    "old": "old nswrap (a839e00)",
    "handwritten": "same design by hand",
    "bestalt": "best alternative",
    "direct+conntrack": "direct + stateful firewall",
    "nswrap-global6": "nswrap, --ipv6-forwarding global",
    "nswrap-bpf": "nswrap --datapath bpf",
}

# Issue 27's targets for the tc-BPF fast path (--datapath bpf), stated next to the figures (the
# report judges them; no test asserts them): (key, figure, bound, higher is better)
FAST_TARGETS = {"p50": ("round trip p50", 1.05, False), "flows": ("new UDP flows/s", 0.9, True),
                "dns": ("DNS max rate", 0.93, True)}

# What earlier measurements found (issues 7, 11, 12, 13, 15), quoted for the closing note.
ISSUE_FIGURES = {
    "rt_12": "2.0×",
    "unrelated_12": "1.7×",
    "cpu_13": "~0.6 core",
    "ports_100": "~6 s (1 port ~0.8 s)",
    "dns_hand": "0.81–0.93",
    "dns_alt": "0.63–0.74",
    "first_answer": "0.9 s / 2.5 s",
    "true_ratio": "3.1–3.7",
    "pss": "32.8 MB",
    "p50": "1.32",
    "tx": "0.80",
    "flows": "0.61",
    "flood_after": "22–29 % (direct 0 %)",
    "list_full": "152 s",
    "full_table_start": "424 s (200,000 flows to the published port)",
}


def fmt(value, spec: str = ".2f", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def ok(value, predicate) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "yes" if predicate(value) else "**no**"


# --- the figures ------------------------------------------------------------------------------


def targets(r: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, met) for every target of the issues."""
    c, d, st, sc, fl = r["costs"], r["dns"], r["startup"], r["scale"], r["flood"]
    cr = c["ratio_to_direct"]["nswrap"]
    rows = []

    def row(name, value, spec, target, predicate, pair=None):
        measured = fmt(value, spec) + (f" (paired {fmt(pair, spec)})" if pair is not None else "")
        rows.append((name, measured, target, ok(value, predicate)))

    dp = d.get("paired", {})
    cp = get(c, "paired_to_direct", "nswrap", default={})
    for sockets in ("few", "many"):
        row(f"DNS max rate, nswrap ÷ same design by hand, {sockets} sockets", d["ratios"]["nswrap_to_handwritten"][sockets],
            ".3f", "≥ 0.97", lambda v: v >= 0.97, get(dp, "nswrap_to_handwritten", sockets))
    for sockets in ("few", "many"):
        row(f"DNS max rate, nswrap ÷ best alternative, {sockets} sockets", d["ratios"]["nswrap_to_bestalt"][sockets],
            ".3f", "≥ 0.85 (aim)", lambda v: v >= 0.85, get(dp, "nswrap_to_bestalt", sockets))
    row("round trip p50, nswrap ÷ direct", cr["p50"], ".3f", "≤ 1.10 (aim)", lambda v: v <= 1.10, cp.get("p50"))
    row("iperf3 TCP throughput, nswrap ÷ direct", cr["tcp"], ".3f", "≥ 0.9 (aim)", lambda v: v >= 0.9, cp.get("tcp"))
    row("iperf3 UDP throughput, nswrap ÷ direct", cr["udp"], ".3f", "≥ 0.9 (aim)", lambda v: v >= 0.9, cp.get("udp"))
    row("new flows/s, nswrap ÷ direct", cr["flows"], ".3f", "≥ 0.8 (aim)", lambda v: v >= 0.8, cp.get("flows"))
    for figure, value, pair, key in fast_ratios(r):
        name, bound, higher = FAST_TARGETS[key]
        row(f"{figure}, nswrap --datapath bpf ÷ {'best alternative' if key == 'dns' and 'IPv6' not in figure else 'direct'}",
            value, ".3f", f"{'≥' if higher else '≤'} {bound} (issue 27)",
            lambda v, bound=bound, higher=higher: v >= bound if higher else v <= bound, pair)
    nm = st["median"]["nswrap"]
    row("launch → first correct answer, IPv4 (ms)", nm["v4_ms"], ".0f", "≤ 300", lambda v: v <= 300)
    row("launch → first correct answer, IPv6 (ms)", nm["v6_ms"], ".0f", "≤ 300", lambda v: v <= 300)
    row("`nswrap … -- true` ÷ hand-written script", st["true_ratio"], ".2f", "≤ 1.5", lambda v: v <= 1.5)
    pss = get(d, "median", "nswrap", "pss_mb")
    row("wrapper tree PSS (MB)", pss, ".1f", "≤ 20", lambda v: v <= 20)
    new = sc["nswrap"]
    for label in [k for k in new["ratio"] if k.isdigit()]:
        row(
            f"round trip of the wrapped server, {label} other instances ÷ none",
            new["ratio"][label]["wrapped"],
            ".3f",
            "≤ 1.05",
            lambda v: v <= 1.05,
        )
        row(
            f"round trip of unrelated host traffic, {label} other instances ÷ none",
            new["ratio"][label]["unrelated"],
            ".3f",
            "≤ 1.05",
            lambda v: v <= 1.05,
        )
    top = str(max(int(k) for k in new["points"] if k.isdigit()))
    cpu = get(new, "points", top, "cpu_cores_after_last_start")
    row(
        f"CPU of {int(top) + 1} idle instances, {r['meta']['settings']['cpu_window_s']:.0f} s after the last start (cores)",
        cpu,
        ".3f",
        "~0 (≤ 0.01)",
        lambda v: v <= 0.01,
    )
    ports = sc["ports"]["nswrap"]
    row(
        f"start+stop, {r['meta']['settings']['port_list']} listed ports ÷ 1 port",
        ports["ratio"],
        ".2f",
        "≤ 1.10",
        lambda v: v <= 1.10,
    )
    ft = sc["full_table"]
    row(
        f"start+stop: added by {ft['entries']:,} unrelated conntrack entries (ms)",
        ft["added_ms"],
        ".0f",
        "< 1000",
        lambda v: v < 1000,
    )
    runs = fl["runs"]
    for role in ("c2", "c3"):
        n = get(runs, "nswrap", "clients", role, "windows", "after", "loss_percent")
        dd = get(runs, "direct", "clients", role, "windows", "after", "loss_percent")
        row(
            f"flood: loss of {role} in the {r['meta']['settings']['flood_after_s']:.0f} s after it (%), direct: {fmt(dd, '.1f')}",
            n,
            ".1f",
            "≤ direct",
            lambda v, dd=dd: dd is not None and v <= dd + 0.5,
        )
    row("`nswrap list` with a full conntrack table (s)", fl["list"]["list_seconds"], ".2f", "bounded (≤ 5)", lambda v: v <= 5)
    return rows


def summary_table(r: dict) -> str:
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(r)]
    return "\n".join(lines) + "\n"


def glance_table(r: dict) -> list[str]:
    """The page's first table: nswrap's figure, then each alternative's with nswrap ÷ it."""
    c, d, st = r["costs"]["median"], r["dns"]["median"], r["startup"]["median"]
    others = [v for v in ("direct", "handwritten", "recipe2014", "bestalt")]
    few, many = r["dns"]["clients"]["few"], r["dns"]["clients"]["many"]
    # (figure, {variant: value}, number format)
    rows = [
        ("round trip p50, µs (lower is better)", {v: c[v]["p50_us"] for v in c}, ".1f"),
        ("transactions/s, one in flight", {v: c[v]["transactions_per_s"] for v in c}, ",.0f"),
        ("new UDP flows/s", {v: c[v]["flows_per_s"] for v in c}, ",.0f"),
        ("bulk TCP, Gbit/s", {v: c[v]["tcp_gbit_s"] for v in c}, ".2f"),
        ("bulk UDP, Gbit/s received", {v: c[v]["udp_gbit_s"] for v in c}, ".2f"),
        (f"DNS queries/s via eth1, {few} sockets", {v: d[v]["few_qps"] for v in d}, ",.0f"),
        (f"DNS queries/s via eth1, {many} sockets", {v: d[v]["many_qps"] for v in d}, ",.0f"),
        ("launch → first answer, ms (lower is better)", {v: st[v]["v4_ms"] for v in st}, ".0f"),
        ("wrapper memory, PSS MB (lower is better)",
         {v: d[v]["pss_mb"] for v in d if d[v].get("pss_mb") is not None}, ".1f"),
    ]
    lines = ["| figure | nswrap | " + " | ".join(f"{NAMES[v]} (nswrap ÷ it)" for v in others) + " |",
             "|---" * (len(others) + 2) + "|"]
    for name, values, spec in rows:
        mine = values.get("nswrap")
        cells = []
        for v in others:
            other = values.get(v)
            if other is None or mine is None:
                cells.append("–")
            else:
                cells.append(f"{other:{spec}} ({mine / other:.2f}×)" if other else f"{other:{spec}}")
        lines.append(f"| {name} | {fmt(mine, spec)} | " + " | ".join(cells) + " |")
    return lines


def costs_table(r: dict) -> list[str]:
    c, st, d = r["costs"], r["startup"], r["dns"]
    variants = [v for v in ("direct", "direct+conntrack", "nswrap", "nswrap-bpf", "handwritten", "recipe2014", "old")
                if v in c["median"]]
    m, q = c["median"], c["ratio_to_direct"]
    head = "| what it costs | " + " | ".join(NAMES[v] for v in variants) + " |"
    lines = [head, "|---" * (len(variants) + 1) + "|"]

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row(
        "round trip p50 (µs)",
        [
            f"{m[v]['p50_us']:.1f}" + (f" (+{q[v]['added_us']:.1f}, {q[v]['p50']:.2f}×)" if v != "direct" else "")
            for v in variants
        ],
    )
    row("round trip p99 (µs)", [f"{m[v]['p99_us']:.0f}" for v in variants])
    row(
        "transactions/s (one in flight)",
        [f"{m[v]['transactions_per_s']:,.0f}" + (f" ({q[v]['transactions']:.2f}×)" if v != "direct" else "") for v in variants],
    )
    row(
        "new UDP flows/s",
        [f"{m[v]['flows_per_s']:,.0f}" + (f" ({q[v]['flows']:.2f}×)" if v != "direct" else "") for v in variants],
    )
    row(
        "bulk TCP, iperf3 (Gbit/s)",
        [f"{m[v]['tcp_gbit_s']:.2f}" + (f" ({q[v]['tcp']:.2f}×)" if v != "direct" else "") for v in variants],
    )
    row(
        "bulk UDP, iperf3 (Gbit/s received)",
        [f"{m[v]['udp_gbit_s']:.2f}" + (f" ({q[v]['udp']:.2f}×)" if v != "direct" else "") for v in variants],
    )
    sm = st["median"]

    def startup_cell(v: str, key: str, spec: str = ".0f") -> str:
        return fmt(get(sm, v, key), spec) if v in sm else "(not measured)"

    row(
        "launch → first answer, IPv4 / IPv6 (ms)",
        [f"{startup_cell(v, 'v4_ms')} / {startup_cell(v, 'v6_ms')}" if v in sm else "(not measured)" for v in variants],
    )
    row("stop: SIGTERM → gone (ms)", [startup_cell(v, "stop_ms") for v in variants])
    row(
        "start + stop of `-- true` (ms)",
        [fmt(get(st, "true", v, "median_ms"), ".0f") if v in st["true"] else "–" for v in variants],
    )
    row(
        "memory of the wrapper tree, PSS / RSS (MB)",
        [
            f"{get(d, 'median', v, 'pss_mb'):.1f} / {get(d, 'median', v, 'rss_mb'):.1f}"
            if get(d, "median", v, "pss_mb") is not None
            else ("0 (no wrapper)" if v.startswith("direct") else "–")
            for v in variants
        ],
    )
    return lines


def _budget_line(r: dict, key: str, nothing: str, said: str) -> str:
    """A startup figure against its budget: `said` with {ms}, {verdict} and {budget} filled in."""
    figure = r["startup"].get(key)
    if not figure:
        return nothing
    verdict = "within" if figure["within"] else "**over**"
    return said.format(ms=f"{figure['ms']:.0f}", verdict=verdict, budget=f"{figure['budget_ms']:.0f}")


def repair_budget_line(r: dict) -> str:
    """How soon a deleted table is put back, against its budget (scripts/bench.py repair_budget)."""
    return _budget_line(r, "repair", "(no firewall-reload repair measured in this run)",
                        "A firewall reload that deletes nswrap's table (`nft delete table inet nswrap`) is repaired, the "
                        "table listed again as it was, {ms} ms later (median): {verdict} the budget of {budget} ms.")


def import_budget_line(r: dict) -> str:
    """The start path's import cost against its budget (scripts/bench.py import_budget)."""
    return _budget_line(r, "imports", "(no import budget measured in this run)",
                        "The start path's imports (`nswrap.cli`, `nswrap.instance`, `nswrap.commands`) cost {ms} ms "
                        "over a bare interpreter: {verdict} their budget of {budget} ms.")


def ipv6_table(r: dict) -> list[str]:
    """IPv6 through the global forwarding switch (kernels before 6.17) and per interface."""
    v6 = r.get("ipv6")
    if not v6:
        return ["(no IPv6 section in this run)"]
    m, d = v6["median"], v6["median"]["direct"]
    lines = [f"| IPv6, c1 → eth0 | DNS queries/s, {v6['clients']} sockets | ÷ direct | paired ÷ direct "
             "| first answer after launch (ms) |", "|---|---|---|---|---|"]
    for v in [v for v in ("direct", "nswrap", "nswrap-global6", "nswrap-bpf") if v in m]:
        lines.append(f"| {NAMES[v]} | {m[v]['qps6']:,.0f} | {m[v]['qps6'] / d['qps6']:.3f} | "
                     f"{v6['paired_to_direct'][v]:.3f} | {m[v]['first_answer6_ms']:.0f} |")
    return lines


def dns_table(r: dict) -> list[str]:
    d = r["dns"]
    few, many = d["clients"]["few"], d["clients"]["many"]
    variants = [v for v in ("nswrap", "nswrap-bpf", "handwritten", "bestalt", "old") if v in d["median"]]
    m = d["median"]
    lines = [
        f"| DNS max rate (dnsperf, c2 → eth1) | queries/s, {few} sockets | ÷ by hand | ÷ best alternative "
        f"| queries/s, {many} sockets | ÷ by hand | ÷ best alternative | wrapper PSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        cells = []
        for k in ("few", "many"):
            cells += [
                f"{m[v][k + '_qps']:,.0f}",
                f"{m[v][k + '_qps'] / m['handwritten'][k + '_qps']:.3f}",
                f"{m[v][k + '_qps'] / m['bestalt'][k + '_qps']:.3f}",
            ]
        lines.append(f"| {NAMES[v]} | " + " | ".join(cells) + f" | {fmt(m[v].get('pss_mb'), '.1f')} |")
    return lines


def fast_ratios(r: dict) -> list[tuple[str, float, float | None, str]]:
    """(figure, bpf ÷ direct, paired, FAST_TARGETS key) for what this run measured of the fast
    path; DNS through eth1 divides by the best alternative (the server bound directly, with the
    `ip rule` per address it needs to answer through eth1 at all)."""
    out = []
    c, d, v6 = r.get("costs", {}), r.get("dns", {}), r.get("ipv6") or {}
    for key in ("p50", "flows"):
        value = get(c, "ratio_to_direct", "nswrap-bpf", key)
        if value is not None:
            out.append((FAST_TARGETS[key][0], value, get(c, "paired_to_direct", "nswrap-bpf", key), key))
    for k in ("few", "many"):
        value = get(d, "ratios", "nswrap-bpf_to_bestalt", k)
        if value is not None:
            out.append((f"DNS max rate via eth1, {get(d, 'clients', k)} sockets", value,
                        get(d, "paired", "nswrap-bpf_to_bestalt", k), "dns"))
    m = v6.get("median", {})
    if "nswrap-bpf" in m:
        out.append((f"DNS max rate over IPv6 via eth0, {v6['clients']} sockets", m["nswrap-bpf"]["qps6"] / m["direct"]["qps6"],
                    get(v6, "paired_to_direct", "nswrap-bpf"), "dns"))
    return out


def fastpath_table(r: dict) -> list[str]:
    """Issue 27's figures side by side: direct / nft / bpf / by hand, ratios to direct, targets."""
    c, d, v6 = r.get("costs", {}), r.get("dns", {}), r.get("ipv6") or {}
    if "nswrap-bpf" not in c.get("median", {}) and "nswrap-bpf" not in d.get("median", {}):
        return ["(the fast path was not measured in this run)"]
    columns = ("direct", "nswrap", "nswrap-bpf", "handwritten")
    lines = ["| figure (÷ the server bound directly) | server bound directly | nswrap (nft) | nswrap --datapath bpf "
             "| same design by hand | issue 27's target for bpf | bpf meets it |", "|---|---|---|---|---|---|---|"]

    def row(name: str, values: dict, spec: str, key: str, paired: float | None) -> None:
        base = values.get("direct")
        cells = []
        for v in columns:
            x = values.get(v)
            if x is None:
                cells.append("–")
            elif v == "direct" or not base:
                cells.append(format(x, spec))
            else:
                cells.append(f"{x:{spec}} ({x / base:.2f}×)")
        _, bound, higher = FAST_TARGETS[key]
        ratio = values["nswrap-bpf"] / base if base and values.get("nswrap-bpf") is not None else None
        target = f"{'≥' if higher else '≤'} {bound}×"
        verdict = ok(ratio, lambda v: v >= bound if higher else v <= bound)
        if paired is not None:
            verdict += f" ({fmt(ratio, '.3f')}, paired {paired:.3f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {target} | {verdict} |")

    cm = c.get("median", {})
    if "nswrap-bpf" in cm:
        row("round trip p50, µs (lower is better)", {v: cm[v]["p50_us"] for v in columns if v in cm}, ".1f", "p50",
            get(c, "paired_to_direct", "nswrap-bpf", "p50"))
        row("new UDP flows/s", {v: cm[v]["flows_per_s"] for v in columns if v in cm}, ",.0f", "flows",
            get(c, "paired_to_direct", "nswrap-bpf", "flows"))
    dm = d.get("median", {})
    if "nswrap-bpf" in dm:
        for k in ("few", "many"):
            values = {("direct" if v == "bestalt" else v): dm[v][f"{k}_qps"]
                      for v in ("bestalt", "nswrap", "nswrap-bpf", "handwritten") if v in dm}
            row(f"DNS queries/s via eth1, {d['clients'][k]} sockets (direct: the best alternative)", values, ",.0f", "dns",
                get(d, "paired", "nswrap-bpf_to_bestalt", k))
    vm = v6.get("median", {})
    if "nswrap-bpf" in vm:
        row(f"DNS queries/s over IPv6 via eth0, {v6['clients']} sockets", {v: vm[v]["qps6"] for v in columns if v in vm},
            ",.0f", "dns", get(v6, "paired_to_direct", "nswrap-bpf"))
    return lines


def scale_table(r: dict) -> list[str]:
    sc = r["scale"]
    w = f"{r['meta']['settings']['cpu_window_s']:.0f}"
    lines = [
        "| instances besides the measured one | variant | round trip, wrapped server (µs, ÷ none; ÷ 0 before / after) "
        "| round trip, unrelated traffic (µs, ÷ none; ÷ 0 before / after) | control round trip (µs) "
        f"| start+stop of one more (`-- true`, ms) | CPU of all instances (cores): first {w} s / next {w} s |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in ("nswrap", "old"):
        if v not in sc:
            continue
        x = sc[v]
        for label, p in x["points"].items():
            ratio = x["ratio"].get(label)
            ends = [x["points"][e]["p50_us"] for e in ("0", "0 again") if e in x["points"]]
            cells = []
            for k in ("wrapped", "unrelated"):
                each = " / ".join(f"{p['p50_us'][k] / e[k]:.2f}" for e in ends)
                cells.append(f"{p['p50_us'][k]:.1f}" + (f" ({ratio[k]:.2f}×; {each})" if ratio else ""))
            control = fmt(p["p50_us"].get("control"), ".1f")
            cpu = f"{p['cpu_cores_after_last_start']:.3f} / {p['cpu_cores_later']:.3f}" if "cpu_cores_later" in p else "–"
            name = NAMES[v] + (f" (--mark-mask {x['mask']})" if x.get("mask") else "")
            lines.append(f"| {label} | {name} | {cells[0]} | {cells[1]} | {control} | {p['true']['median_ms']:.0f} | {cpu} |")
    return lines


def flood_table(r: dict) -> list[str]:
    fl = r["flood"]
    s = r["meta"]["settings"]
    lines = [
        f"| variant | flood (new flows, s) | conntrack peak (max {fl['max']:,}) "
        f"| c2 (eth1) loss before / during / {s['flood_after_s']:.0f} s after (%) "
        f"| c3 (eth2) loss before / during / after (%) |",
        "|---|---|---|---|---|",
    ]
    for v, x in fl["runs"].items():
        cells = []
        for role in ("c2", "c3"):
            w = x["clients"][role]["windows"]
            cells.append(" / ".join(fmt(w[k]["loss_percent"], ".1f") for k in ("before", "during", "after")))
        lines.append(
            f"| {NAMES[v]} | {x['flood']['sent']:,} in {x['flood']['seconds']:.1f} s | {x['conntrack_peak']:,} "
            f"| {cells[0]} | {cells[1]} |"
        )
    return lines


def cpu_pair(point: dict | None) -> str:
    """CPU of the first and the next window after the last start, in cores."""
    if not point:
        return "–"
    return f"{fmt(point.get('cpu_cores_after_last_start'), '.3f')} / {fmt(point.get('cpu_cores_later'), '.3f')} cores"


def before_after(r: dict) -> list[str]:
    """The closing note: each figure with the old code (this run, when it ran) and now."""
    w = f"{r['meta']['settings']['cpu_window_s']:.0f}"
    c, d, st, sc, fl = r["costs"], r["dns"], r["startup"], r["scale"], r["flood"]
    has_old = "old" in c["median"]
    lines = [
        "| figure | issue's figure (earlier runs) | before: a839e00, this run | after: this tree, this run |",
        "|---|---|---|---|",
    ]

    def row(name, issue, before, after):
        lines.append(f"| {name} | {issue} | {before if has_old else '(not run: no --compare-with)'} | {after} |")

    q = c["ratio_to_direct"]
    row("round trip p50 ÷ direct", ISSUE_FIGURES["p50"], fmt(get(q, "old", "p50"), ".2f"), fmt(q["nswrap"]["p50"], ".2f"))
    row(
        "transactions/s ÷ direct",
        ISSUE_FIGURES["tx"],
        fmt(get(q, "old", "transactions"), ".2f"),
        fmt(q["nswrap"]["transactions"], ".2f"),
    )
    row("new flows/s ÷ direct", ISSUE_FIGURES["flows"], fmt(get(q, "old", "flows"), ".2f"), fmt(q["nswrap"]["flows"], ".2f"))
    row(
        "iperf3 TCP / UDP ÷ direct",
        "(not measured)",
        f"{fmt(get(q, 'old', 'tcp'), '.2f')} / {fmt(get(q, 'old', 'udp'), '.2f')}",
        f"{q['nswrap']['tcp']:.2f} / {q['nswrap']['udp']:.2f}",
    )
    dr = d["ratios"]
    row(
        "DNS max rate ÷ same design by hand (few / many sockets)",
        ISSUE_FIGURES["dns_hand"],
        f"{fmt(get(dr, 'old_to_handwritten', 'few'), '.3f')} / {fmt(get(dr, 'old_to_handwritten', 'many'), '.3f')}",
        f"{dr['nswrap_to_handwritten']['few']:.3f} / {dr['nswrap_to_handwritten']['many']:.3f}",
    )
    row(
        "DNS max rate ÷ best alternative (few / many sockets)",
        ISSUE_FIGURES["dns_alt"],
        f"{fmt(get(dr, 'old_to_bestalt', 'few'), '.3f')} / {fmt(get(dr, 'old_to_bestalt', 'many'), '.3f')}",
        f"{dr['nswrap_to_bestalt']['few']:.3f} / {dr['nswrap_to_bestalt']['many']:.3f}",
    )
    sm = st["median"]
    row(
        "launch → first answer IPv4 / IPv6",
        ISSUE_FIGURES["first_answer"],
        f"{fmt(get(sm, 'old', 'v4_ms'), '.0f')} / {fmt(get(sm, 'old', 'v6_ms'), '.0f')} ms",
        f"{sm['nswrap']['v4_ms']:.0f} / {sm['nswrap']['v6_ms']:.0f} ms",
    )
    old_true = get(st, "true", "old", "median_ms")
    row(
        "`-- true` ÷ hand-written script",
        ISSUE_FIGURES["true_ratio"],
        fmt(old_true / st["true"]["handwritten"]["median_ms"] if old_true else None, ".2f"),
        f"{st['true_ratio']:.2f}",
    )
    row(
        "wrapper tree PSS",
        ISSUE_FIGURES["pss"],
        f"{fmt(get(d, 'median', 'old', 'pss_mb'), '.1f')} MB",
        f"{fmt(get(d, 'median', 'nswrap', 'pss_mb'), '.1f')} MB",
    )
    old_sc = sc.get("old", {})
    old_label = next((k for k in old_sc.get("ratio", {}) if k.isdigit()), None)
    new_label = old_label if old_label in sc["nswrap"]["ratio"] else None
    if old_label or new_label:
        label = old_label or new_label
        row(
            f"round trip, wrapped server, {label} other idle instances ÷ none",
            ISSUE_FIGURES["rt_12"],
            fmt(get(old_sc, "ratio", label, "wrapped"), ".2f"),
            fmt(get(sc, "nswrap", "ratio", label, "wrapped"), ".2f"),
        )
        row(
            f"round trip, unrelated traffic, {label} other idle instances ÷ none",
            ISSUE_FIGURES["unrelated_12"],
            fmt(get(old_sc, "ratio", label, "unrelated"), ".2f"),
            fmt(get(sc, "nswrap", "ratio", label, "unrelated"), ".2f"),
        )
        row(
            f"CPU of {int(label) + 1} idle instances, first {w} s after the last start / next {w} s",
            ISSUE_FIGURES["cpu_13"],
            cpu_pair(get(old_sc, "points", label)),
            cpu_pair(get(sc, "nswrap", "points", label)),
        )
    n = r["meta"]["settings"]["port_list"]
    po, pn = get(sc, "ports", "old"), sc["ports"]["nswrap"]
    row(
        f"start+stop with {n} listed ports / with 1",
        ISSUE_FIGURES["ports_100"],
        f"{po[str(n)]['median_ms'] / 1000:.2f} s / {po['1']['median_ms'] / 1000:.2f} s" if po else "–",
        f"{pn[str(n)]['median_ms'] / 1000:.2f} s / {pn['1']['median_ms'] / 1000:.2f} s",
    )
    ft = sc["full_table"]
    lines.append(
        f"| start+stop with {ft['entries']:,} unrelated conntrack entries | {ISSUE_FIGURES['full_table_start']} | (not run) "
        f"| {ft['full']['median_ms'] / 1000:.2f} s (+{ft['added_ms']:.0f} ms) |"
    )
    after = "; ".join(
        f"{role} {fmt(get(fl, 'runs', 'nswrap', 'clients', role, 'windows', 'after', 'loss_percent'), '.1f')} %"
        for role in ("c2", "c3")
    )
    direct = "; ".join(
        f"{role} {fmt(get(fl, 'runs', 'direct', 'clients', role, 'windows', 'after', 'loss_percent'), '.1f')} %"
        for role in ("c2", "c3")
    )
    lines.append(
        f"| flood: loss on the other uplinks after it | {ISSUE_FIGURES['flood_after']} | (not run) | {after} (direct: {direct}) |"
    )
    lines.append(
        f"| `nswrap list` with a full table | {ISSUE_FIGURES['list_full']} | (not run) | {fl['list']['list_seconds']:.2f} s "
        f"({fl['list']['entries']:,} entries) |"
    )
    return lines


def profile_lines(r: dict) -> list[str]:
    p = r["startup"]["profile"]
    lines = [
        f"Interpreter alone (`python -c pass`): {p['python_startup_ms']:.0f} ms. Imports of a real start "
        f"(`-X importtime`, sum of self times): {p['imports_total_ms']:.0f} ms, of which nswrap's own modules "
        f"{p['imports_nswrap_ms']:.0f} ms. cProfile of a whole `nswrap --ports 53 -- true` (profiled, so slower): "
        f"{p['cprofile_total_ms']:.0f} ms.",
        "",
        "| top-level import | cumulative ms |",
        "|---|---|",
    ]
    lines += [f"| {i['module']} | {i['cumulative_ms']:.1f} |" for i in p["top_imports"][:10]]
    lines += ["", "| nswrap function (cProfile, by cumulative time) | calls | cumulative ms | self ms |", "|---|---|---|---|"]
    lines += [
        f"| `{f['function']}` | {f['calls']} | {f['cumtime_ms']} | {f['tottime_ms']} |" for f in p["cprofile_top_cumulative"][:15]
    ]
    return lines


PLURAL = {"query": "queries", "flow": "flows"}
AGAINST = {"handwritten": "the same design by hand", "bestalt": "the best alternative",
           "direct+conntrack": "the server bound directly on a host that tracks connections",
           "direct": "the server bound directly", "nswrap": "nswrap with the nft datapath"}
# (variant, base): the differences each CPU profile spells out, when both were profiled
PROFILE_DIFFS = (("nswrap", "handwritten"), ("nswrap", "bestalt"), ("nswrap", "direct+conntrack"),
                 ("nswrap-bpf", "bestalt"), ("nswrap-bpf", "direct"), ("nswrap-bpf", "nswrap"))


def profile_diff(prof: dict, a: str, b: str) -> tuple[float, dict[str, float]]:
    """CPU per operation of variant *a* minus *b*: in all, and by function group."""
    x, y = prof[a]["cpu_us_per_query"], prof[b]["cpu_us_per_query"]
    return (prof[a]["cpu_us_per_query_total"] - prof[b]["cpu_us_per_query_total"],
            {g: x.get(g, 0.0) - y.get(g, 0.0) for g in dict.fromkeys([*x, *y, "nftables"])})


def cpu_profile_table(prof: dict, what: str = "query") -> list[str]:
    """CPU per answered query (or flow) by kernel function group (perf), side by side."""
    if not prof:
        return ["(no profile: `perf` was not available)"]
    variants = list(prof)
    groups: list[str] = []
    for v in variants:
        groups += [g for g in prof[v]["cpu_us_per_query"] if g not in groups]
    lines = [
        f"| CPU per answered {what} (µs, both CPUs) | " + " | ".join(NAMES[v] for v in variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(fmt(prof[v]["cpu_us_per_query"].get(g, 0.0), ".2f") for v in variants) + " |")
    lines.append("| **total** | " + " | ".join(f"**{prof[v]['cpu_us_per_query_total']:.2f}**" for v in variants) + " |")
    if all("qps" in prof[v] for v in variants):  # results of runs before flows were profiled too
        lines.append("| queries/s while profiled | " + " | ".join(f"{prof[v]['qps']:,.0f}" for v in variants) + " |")
    else:
        counts = " | ".join(f"{prof[v]['operations']:,.0f}" for v in variants)
        lines.append(f"| {PLURAL[what]} answered while profiled | {counts} |")
    for variant, base in PROFILE_DIFFS:
        if variant not in prof or base not in prof:
            continue
        total, by_group = profile_diff(prof, variant, base)
        diff = sorted(((d, g) for g, d in by_group.items()), reverse=True)
        lines += [
            "",
            f"{NAMES[variant]} against {AGAINST[base]}: {total:+.2f} µs per {what} in all, "
            + ", ".join(f"{g} {d:+.2f}" for d, g in diff if abs(d) >= 0.05)
            + " (differences under ~0.3 µs are within this profile's noise).",
        ]
    for variant in ("nswrap", "nswrap-bpf"):
        if variant in prof:
            lines += [
                "",
                f"Hottest functions under {NAMES[variant]} (µs per {what}; kernel and user space): "
                + ", ".join(f"`{x['symbol']}` {x['us_per_query']:.2f}" for x in prof[variant]["top_symbols"][:10])
                + ".",
            ]
    return lines


def floor_note(r: dict) -> list[str]:
    """What of the distance to direct conntrack alone and the design itself account for."""
    q = r["costs"]["ratio_to_direct"]
    if not all(v in q for v in ("direct+conntrack", "handwritten", "nswrap")):
        return []

    prof = r["dns"].get("profile") or {}
    nft_note = ""
    if "nswrap" in prof and "handwritten" in prof:
        nft_note = f" (nftables {profile_diff(prof, 'nswrap', 'handwritten')[1]['nftables']:+.2f} µs per DNS query, two packets)"

    def cells(v: str) -> str:
        x = q[v]
        return (f"round trip {x['p50']:.2f}×, transactions {x['transactions']:.2f}×, TCP {x['tcp']:.2f}×, "
                f"UDP {x['udp']:.2f}×, new flows {x['flows']:.2f}×")

    return [
        "- **The design itself**: the aims for round trip, bulk throughput and new flows divide by a server that "
        "crosses no namespace and whose host tracks no connection. Against direct, in this run: conntrack alone "
        f"(*direct + stateful firewall*) {cells('direct+conntrack')}; the same design by hand (a second network "
        f"stack, a veth, DNAT and the marks) {cells('handwritten')}; nswrap {cells('nswrap')}. What nswrap adds to "
        f"the design by hand is in the profiles below: on an established packet the check of the server's source, "
        f"the forward guard's interface tests, the check of an answer's uplink and the clearing of nswrap's mark "
        f"bits{nft_note}, which the hand-written guard skips (it accepts any "
        "DNATed flow, and so a forged reply, and leaves its marks on: docs/design.md), and on the first packet of a "
        "flow the checks the hand-written recipe leaves out "
        "(docs/design.md, \"The packet path\").",
    ]


def readiness_note(r: dict) -> str:
    sm = r["startup"]["median"]
    notes = []
    for v in ("nswrap", "old"):
        if v in sm:
            missing, reps = sm[v]["ready_missing"], len(r["startup"]["runs"][v])
            if missing:
                notes.append(
                    f"{NAMES[v]}: READY on --ready-fd did not come within 2 s of the first answer in {missing} of {reps} starts"
                )
            else:
                notes.append(
                    f"{NAMES[v]}: READY at {sm[v]['ready_ms']:.0f} ms (median), first answers at "
                    f"{sm[v]['v4_ms']:.0f} / {sm[v]['v6_ms']:.0f} ms"
                )
    idle = [x for x in r["scale"]["nswrap"]["idle_start"] if x["ready_ms"] is None]
    if idle:
        notes.append(
            f"nswrap: {len(idle)} of {len(r['scale']['nswrap']['idle_start'])} idle instances of the scale section "
            "never sent READY"
        )
    return "; ".join(notes) + "."


# --- documents --------------------------------------------------------------------------------


def load_line(loadavg: dict[str, list[float]]) -> str:
    """The machine's load around each section (the benchmark's own processes add about 1-2)."""
    return ("Load average (1 min) at the start / end of each section, the benchmark's own processes included: "
            + ", ".join(f"{k} {a:.1f} / {b:.1f}" for k, (a, b) in loadavg.items()) + ".")


def header(r: dict) -> list[str]:
    m = r["meta"]
    tools = ", ".join(v if k.lower() in v.lower() else f"{k} {v.removeprefix('Version ')}" for k, v in m["versions"].items())
    lines = [
        f"Run of {m['date']} ({m['mode']} mode, {m['seconds'] / 60:.0f} min), tree `{m['commit']}`, kernel {m['kernel']}, "
        f"{m['cpus']} CPUs (a VM); {tools}." + (f" Before figures: {m['old']}." if m.get("old") else "")
    ]
    if m.get("loadavg"):
        lines.append(load_line(m["loadavg"]))
    parts = m.get("merged", [])
    for i, part in enumerate(parts):
        later = {name for p in parts[i + 1:] for name in p["sections"]}
        still = [name for name in part["sections"] if name not in later]  # merge keeps a part while one is left
        gone = [name for name in part["sections"] if name in later]
        loads = {k: v for k, v in part.get("loadavg", {}).items() if k in still}
        lines.append(
            f"Section{'s' if len(still) > 1 else ''} {', '.join(still)} come{'' if len(still) > 1 else 's'} from a later "
            f"run, of {part['date']} ({part['mode']} mode, "
            f"{part['seconds'] / 60:.0f} min, `scripts/bench --only`), tree `{part['commit']}`, kernel {part['kernel']}"
            + (f", before figures {part['old']}" if part.get("old") else ", without the old version")
            + f"; {'they' if len(still) > 1 else 'it'} replaced that run's figures of the same "
            f"section{'s' if len(still) > 1 else ''}, the others are the run above's. Every ratio "
            "still compares figures of one run (a table may hold rows of both)."
            + (" " + load_line(loads) if loads else "")
            + (f" (Its figures of {', '.join(gone)} were replaced again, by the run below.)" if gone else "")
            + (f" {part['note']}" if part.get("note") else "")
        )
    return lines


def merge(base: dict, partial: dict, note: str | None = None) -> dict:
    """*base* with the sections of *partial* (a `bench.py --only` run) in place of its own; the
    partial run is recorded in meta["merged"], with *note* (what the reader should know about
    it, e.g. other work on the machine). Both runs must be of the same mode and settings, or the
    figures of one page would not be comparable."""
    bm, pm = base["meta"], partial["meta"]
    if (bm["mode"], bm["settings"]) != (pm["mode"], pm["settings"]):
        raise SystemExit(f"cannot merge a {pm['mode']} run into a {bm['mode']} one, or runs of other settings")
    out = dict(base)
    out["meta"] = dict(bm)
    for name in pm["sections"]:
        out[name] = partial[name]
        out["meta"].setdefault("section_seconds", {})[name] = pm["section_seconds"][name]
    earlier = [p for p in bm.get("merged", []) if not set(p["sections"]) <= set(pm["sections"])]
    keep = ("date", "commit", "kernel", "mode", "seconds", "old", "versions", "loadavg")
    out["meta"]["merged"] = [*earlier, {"sections": pm["sections"], **{k: pm.get(k) for k in keep},
                                        **({"note": note} if note else {})}]
    return out


def results_md(r: dict) -> str:
    """Every table of the run (docs/bench/results.md)."""
    lines = [
        "# nswrap benchmark results",
        "",
        *header(r),
        "",
        "Generated by `scripts/bench` from `results.json` beside this file.",
        "",
        "## Targets",
        "",
        summary_table(r),
        "## What nswrap costs a user",
        "",
        *costs_table(r),
        "",
        "## DNS max rate",
        "",
        *dns_table(r),
        "",
        "## IPv6: per interface and the global switch",
        "",
        *ipv6_table(r),
        "",
        "## The fast path (--datapath bpf, issue 27)",
        "",
        *fastpath_table(r),
        "",
        "## Many instances",
        "",
        *scale_table(r),
        "",
    ]
    sc = r["scale"]
    for v in ("nswrap", "old"):
        if v in sc:
            starts = sc[v]["idle_start"]
            lines.append(
                f"{NAMES[v]}: launch → first answer of the k-th idle instance (ms): "
                + ", ".join(f"{x['n']}: {x['answered_ms']:.0f}" for x in starts)
                + "."
            )
            lines.append(
                f"{NAMES[v]}: stop of the k-th idle instance (ms, last started first): "
                + ", ".join(f"{x['n']}: {x['stop_ms']:.0f}" for x in sc[v]["idle_stop"])
                + "."
            )
            lines.append("")
    lines += [
        "| start + stop (`-- true`, median ms) | 1 port | " + f"{r['meta']['settings']['port_list']} listed ports | ratio |",
        "|---|---|---|---|",
    ]
    n = str(r["meta"]["settings"]["port_list"])
    for v, x in sc["ports"].items():
        lines.append(f"| {NAMES[v]} | {x['1']['median_ms']:.0f} | {x[n]['median_ms']:.0f} | {x['ratio']:.2f} |")
    ft = sc["full_table"]
    lines += [
        "",
        f"`nswrap --ports 53,53/tcp -- true` with an empty conntrack table: {ft['empty']['median_ms']:.0f} ms; with "
        f"{ft['entries']:,} unrelated entries: {ft['full']['median_ms']:.0f} ms ({ft['entries_after']:,} entries left after).",
        "",
        "## Flood",
        "",
        *flood_table(r),
        "",
        f"`nswrap list --json` with {r['flood']['list']['entries']:,} entries in the table: "
        f"{r['flood']['list']['list_seconds']:.2f} s "
        f"(exit {r['flood']['list']['list_exit']}, it reported {r['flood']['list']['list_conntrack']}); stop with that table: "
        f"{r['flood']['list']['stop_seconds']:.2f} s.",
        "",
        "## Start-up",
        "",
        readiness_note(r),
        "",
        *profile_lines(r),
        "",
        "## CPU per DNS query",
        "",
        *cpu_profile_table(r["dns"].get("profile") or {}),
        "",
        "## CPU per new flow",
        "",
        *cpu_profile_table(r["costs"].get("profile") or {}, what="flow"),
        "",
    ]
    return "\n".join(lines) + "\n"


def benchmarks_md(r: dict, charts: str = "bench") -> str:
    """docs/benchmarks.md: what nswrap costs a user first, then scale, floods, method, history."""
    s = r["meta"]["settings"]
    lines = [
        "# nswrap benchmarks",
        "",
        "Generated by `sudo ./scripts/bench` (about 30 minutes; `--quick` for a smoke test of about two minutes, whose "
        "noisy figures go to /tmp and never here). Every figure below comes from one run (or, when a line below says so, "
        "each section from one run: `scripts/bench --only SECTION` then `scripts/bench_report.py --merge`), in which the "
        "variants of each "
        "figure alternate round by round; ratios compare figures of that same run. All tables of the run are in "
        "[bench/results.md](bench/results.md), the raw data in [bench/results.json](bench/results.json).",
        "",
        *header(r),
        "",
        "## At a glance",
        "",
        ("What nswrap costs, from the runs named above" if r["meta"].get("merged") else
         f"What nswrap costs, from the run of {r['meta']['date']} (tree `{r['meta']['commit']}`)") + ": nswrap's figure, then "
        "each alternative's with nswrap's divided by it. For times (round trip, first answer) below 1× means nswrap is "
        "faster; for rates, above 1× means it does more. *Server bound directly* answers only the paths the main "
        "routing table happens to serve (not eth1, where the DNS figures are taken); *best alternative* helps only "
        "servers that use IP_PKTINFO (both below). Targets come last (*Targets*).",
        "",
        *glance_table(r),
        "",
        "## What nswrap costs you",
        "",
        "A UDP/TCP server on the simulated multihomed host (tests/lab: three uplinks, clients behind routers), reached "
        "from client c1 through router r1 (round trips, throughput) or from c3 on eth2's subnet (new flows), against the "
        "same server bound directly on the host (it then answers only on the paths the main routing table happens to "
        "serve), the same on a host whose stateful firewall tracks connections (*direct + stateful firewall*: one `ct "
        "state` rule, as most hosts have; conntrack is what the design needs too), the same design written by hand "
        "(below) and the 2014 veth-loop recipe:",
        "",
        *costs_table(r),
        "",
        "Memory is the wrapper's own processes (nswrap and its init in the server's PID namespace; bash for the hand-written "
        "script), without the server, as PSS from `/proc/<pid>/smaps_rollup`: shared pages are counted once.",
        "",
        "### DNS: nswrap against the same design by hand and the best alternative",
        "",
        "unbound answering one local name, at the highest rate dnsperf gets from c2 through eth1 (the uplink that is not the "
        "main table's, the case nswrap exists for), with a few client sockets and with many:",
        "",
        *dns_table(r),
        "",
        import_budget_line(r),
        "",
        repair_budget_line(r),
        "",
        "### IPv6: per-interface forwarding and the global switch",
        "",
        "The same unbound over IPv6 from c1 through eth0: nswrap with per-interface forwarding (`force_forwarding`, "
        "Linux ≥ 6.17, this kernel) and with `--ipv6-forwarding global` as on an older kernel (the test seam makes "
        "nswrap see one: it holds `net.ipv6.conf.all.forwarding`, sets `accept_ra=2`, and its guard drops IPv6 it did "
        "not forward before), against the server bound directly (eth0 is the main table's uplink, the one path where "
        "a direct server answers). The first answer includes nswrap's start.",
        "",
        *ipv6_table(r),
        "",
        "*Same design by hand* is `scripts/bench_handwritten.sh`: one nft table with DNAT maps keyed by uplink and address "
        "(as nswrap's `keep` maps; nswrap's own instance uses `any`, behind a fib lookup), verdict maps and "
        "per-uplink chains as nswrap's for one instance, one routing table and fwmark rule per uplink, the `to "
        "198.18.0.0/15 lookup main suppress_prefixlength 0` rule, a two-rule forward guard; nothing else. *Best "
        "alternative* needs no namespace and no NAT: unbound with `interface-automatic: yes` (IP_PKTINFO) plus one "
        "`ip rule from ADDR lookup <table of its uplink>` per address; it only helps servers that use IP_PKTINFO.",
        "",
        "## The fast path: --datapath bpf (issue 27)",
        "",
        "nswrap with `--datapath bpf`: tc programs on the uplinks' ingress and the veths' host ends take a published flow "
        "straight into the server's namespace (`bpf_redirect_peer`) and its answers straight out of their uplink "
        "(`bpf_redirect_neigh`), past the host's netfilter, conntrack and forwarding (nswrap/fastpath.py, "
        "nswrap/bpf/fastpath.bpf.c). Issue 27's targets are measured here, not asserted by any test: round trip ≤ "
        "1.05× direct, DNS max rate ≥ 0.93× direct, new flows ≥ 0.9× direct. The figures are those of the tables above "
        "(same runs, same rounds); bpf always ran right before or after the variant its target divides by. DNS through "
        "eth1 divides by the best alternative, the server bound directly with the `ip rule` per address it needs to "
        "answer through eth1 at all; over IPv6 (eth0) by the server bound directly.",
        "",
        *fastpath_table(r),
        "",
        "## Many instances on one host",
        "",
        *scale_table(r),
        "",
        "The measured instances are a wrapped sockperf server (*wrapped*) and a sockperf server bound directly on the host "
        "on a port nobody publishes (*unrelated*); the others are idle UDP echo servers, each under its own nswrap, started one "
        "after the other. *0 again* is measured after all others stopped; the ratios divide by the median of both "
        "0-instance measurements. Each round also measures a *control* round trip, from c1 to its router r1, that never "
        "reaches the host: how much it moves from point to point is this shared VM's noise, against which the ratios "
        "should be read (it is not divided out: in some runs it moves with the host's paths, in others not). Each ratio "
        "is also given against each 0 point alone: when the two differ much, the machine moved between them.",
        "",
        f"Start + stop with {s['port_list']} ports listed one by one against one port, and with many unrelated flows in the "
        "conntrack table:",
        "",
    ]
    n = str(s["port_list"])
    sc = r["scale"]
    lines += ["| start + stop (`-- true`, median ms) | 1 port | " + f"{n} listed ports | ratio |", "|---|---|---|---|"]
    lines += [
        f"| {NAMES[v]} | {x['1']['median_ms']:.0f} | {x[n]['median_ms']:.0f} | {x['ratio']:.2f} |" for v, x in sc["ports"].items()
    ]
    ft = sc["full_table"]
    fl = r["flood"]
    lines += [
        "",
        f"With {ft['entries']:,} unrelated entries in the conntrack table, `nswrap --ports 53,53/tcp -- true` took "
        f"{ft['full']['median_ms']:.0f} ms against {ft['empty']['median_ms']:.0f} ms with an empty table.",
        "",
        "## Floods",
        "",
        f"A flood of {s['flood_flows']:,} new UDP flows (DNS queries from ever new source address and port, spoofed within "
        f"c1's subnet, arriving on eth0), while legitimate clients on the *other* uplinks (c2 on eth1, c3 on eth2) ask one "
        f"query every {s['legit_interval_s'] * 1000:.0f} ms, each from a new socket (a new flow, as resolvers do), and count "
        f"an answer missing after 1 s as lost. The table holds {fl['max']:,} entries (`nf_conntrack_max`, not settable inside "
        "a network namespace).",
        "",
        *flood_table(r),
        "",
        f"The server bound directly (the best alternative's setup) never loads conntrack in the host's namespace: the flood "
        f"only costs it CPU. *Direct + stateful firewall* adds one `ct state` rule, as any host firewall does, and so "
        "fills the same table. The flood is sent by one process whose system calls also carry its packets through "
        "the lab's routers and the host (all on this machine's two CPUs), so the more a variant costs per new flow, the "
        "slower the same flood arrives: compare the flood durations. "
        f"`nswrap list` with {fl['list']['entries']:,} entries in the table took "
        f"{fl['list']['list_seconds']:.2f} s.",
        "",
        "## Targets",
        "",
        summary_table(r),
        "A target is judged on the ratio of the medians over rounds. *Paired* is the median of the round-by-round "
        "ratios: the variants of one round ran minutes apart, so it moves less with the machine's drift between "
        "rounds; where the two differ much, this VM moved during the run.",
        "",
        "## Before and after (closing note)",
        "",
        "*Before* is a839e00, the last version with one nft table, mark and routing table per instance and uplink, run by "
        "this same benchmark (`--compare-with`) on the same lab in the same run; where more than five of its instances run, "
        f"it needs `--mark-mask {sc.get('old', {}).get('mask') or '0xff000000'}` (with the default mask the sixth instance "
        "fails: 15 marks for instances × uplinks).",
        "",
        *before_after(r),
        "",
        "## What stands between nswrap and the floor",
        "",
        "- **Flowtables**: this kernel has no `CONFIG_NF_FLOW_TABLE` (creating a flowtable fails), so there is no "
        "flowtable fast path to measure; none ships (docs/design.md). The fast path nswrap offers instead is tc-BPF "
        "(`--datapath bpf`, *The fast path* above), which needs neither flowtables nor conntrack.",
        "- **Readiness**: " + readiness_note(r),
        *floor_note(r),
        "",
        "### Where a DNS query's CPU goes",
        "",
        f"`perf record -a -F 999` during one more dnsperf run of each variant ({r['dns']['clients']['few']} sockets), "
        "samples grouped by kernel function (user space is unbound and dnsperf); CPU time per answered query:",
        "",
        *cpu_profile_table(r["dns"].get("profile") or {}),
        "",
        "### Where a new flow's CPU goes",
        "",
        f"The same, during one more run of {s['flows']:,} new UDP flows from c3 (one datagram each, echoed), of the "
        "server bound directly, on a host that tracks connections, and wrapped by nswrap and by hand; user space is "
        "the raw-socket client and the echo server (both Python). A new flow costs conntrack an entry and NAT a "
        "binding in the host, a second network stack and a veth crossing: what *direct + stateful firewall* does "
        "not pay beyond conntrack is the design's; what *same design by hand* does not pay is nswrap's own "
        "(docs/design.md, \"The packet path\"):",
        "",
        *cpu_profile_table(r["costs"].get("profile") or {}, what="flow"),
        "",
        "### Start-up profile",
        "",
        *profile_lines(r),
        "",
        "## How it is measured",
        "",
        "- **Lab**: tests/lab builds the host and its clients as network namespaces; every figure is taken there, on a "
        "2-CPU VM that may have other work. Round trips pin client and server to the same CPU (`taskset -c 1`): unpinned, "
        "cross-CPU wake-ups on this VM add 60–130 µs of noise. Throughput tests pin the client to CPU 0 and the server "
        "with its wrapper to CPU 1.",
        f"- **Rounds**: {s['rounds']} rounds ({s.get('dns_rounds', s['rounds'])} for DNS, whose rates swing most); each "
        "round runs every variant once, in a rotated order, each started alone and stopped before the next (so none "
        "sees another's rules); in the DNS rounds nswrap and the same design by hand always run one right after the "
        "other (their order alternating), since a target is judged on their ratio, and so do nswrap --datapath bpf and "
        "the best alternative; in the costs rounds, nswrap --datapath bpf and the server bound directly. Figures are "
        "medians over rounds; "
        "*paired* ratios are medians of the ratios within each round.",
        "- **Installed as users install it**: scripts/bench pip-installs this checkout (not editable, as scripts/install "
        "does) into a venv of its own and measures that; the old version is installed the same way.",
        f"- **Round trip**: `sockperf ping-pong -m 64 --full-rtt -t {s['pingpong_s']}` from c1 to 192.0.2.10 (via r1, "
        "eth0), after a 1-s warm-up; transactions/s is answered messages per second with one in flight.",
        f"- **Bulk**: `iperf3 -t {s['iperf_s']}` TCP, then UDP (`-u -b 0 -l 1400`, the rate the server received), from c1.",
        f"- **New flows**: `scripts/bench_traffic.py flows`: {s['flows']:,} UDP flows, one datagram each, from distinct "
        "(address, port) pairs of c3 over raw sockets, at most 256 unanswered, to a Python echo server; the conntrack "
        "table is flushed before each run.",
        f"- **DNS**: `dnsperf -c {r['dns']['clients']['few']}` and `-c {r['dns']['clients']['many']}` (`-q 200 -T 1 "
        f"-l {s['dnsperf_s']}`), one name from unbound's `local-data` (one thread).",
        f"- **Start-up**: {s['reps']} repetitions per variant: a prober in c1 asks 192.0.2.10 and 2001:db8:1::10 every "
        "millisecond, each query from a new socket; the clock starts when the wrapper (or unbound alone, with "
        "`interface-automatic`) is spawned and stops at the first correct answer from the address asked, per family. "
        "Stop is SIGTERM until the wrapper's whole process group is gone. `-- true` is the wall time of `nswrap --ports "
        "53,53/tcp -- true` against `scripts/bench_handwritten.sh 53,53/tcp -- true`, alternated.",
        f"- **Scale**: idle instances are added one by one up to {max(s['scale_counts'])}; at each count the CPU "
        f"(utime + stime, plus reaped children, of every process of every instance, from `/proc/<pid>/stat`) is summed "
        f"over two windows of {s['cpu_window_s']:.0f} s right after the last start, then {s['scale_rounds']} rounds of "
        f"round trips alternate between the wrapped server, the unrelated one and the control (on r1), "
        f"then `-- true` runs {s['scale_reps']} times "
        f"as one more instance. The full-table case sends {s['unrelated_flows']:,} flows to a port where nothing listens, "
        "with a `ct state` rule in the host and the UDP conntrack timeout raised so that they stay.",
        f"- **Flood**: `scripts/bench_traffic.py blast` (raw socket, at most {s['flood_deadline_s']:.0f} s) and `legit` "
        f"({s['flood_before_s']:.0f} s before, the flood, {s['flood_after_s']:.0f} s after); the conntrack count is sampled "
        "every 250 ms in the host's namespace.",
        "- Everything is bounded in count and time and happens in throwaway namespaces, which are deleted at the end.",
        "",
        "## History",
        "",
        "- **Issue 7 (2026-11-25, per-instance design)**: round trip 1.32× direct (26.3 vs 19.9 µs), transactions 0.80×, "
        "`-- true` 474 ms against 191 ms by hand (2.48×), 100 listed ports 415 ms, wrapper RSS 58.4 MB (PSS 30.7 MB); "
        "the 2014 recipe 1.14× / 0.94×; teardown after 100,000 flows went from 140 s to 0.37 s once flows were "
        "flushed by the kernel.",
        "- **Issue 11 (per-instance design, 3 uplinks)**: the sixth instance failed with the default mask; round trip with "
        "12 other idle instances 2.0×, unrelated traffic 1.7×; 13 idle instances used ~0.6 core for 10 s after the last "
        "start; 100 listed ports ~6 s to start and stop against ~0.8 s for one.",
        "- **Issue 12**: a start with 200,000 flows to the published port took 424 s (flows deleted one by one under the "
        "lock); a flood of ~290,000 flows cost clients on every uplink 5–7 % during it and 22–29 % in the 30 s after it "
        "(direct: 2 % / 0 %); `nswrap list` took 152 s with a full table.",
        "- **Issue 13**: this document was stale (100 listed ports: 415 ms documented, ~6 s measured) and did not show new "
        "flows/s (0.61× direct) or bulk throughput.",
        "- **Issue 15**: DNS max rate 0.63–0.74× the best alternative and 0.81–0.93× the same design by hand; first answer "
        "0.9 s (IPv4) / 2.5 s (IPv6); `-- true` 3.1–3.7× the hand-written script; wrapper RSS / PSS 57.5 / 32.8 MB.",
        "",
        "## Charts",
        "",
        f"![costs]({charts}/latency.png)",
        f"![dns]({charts}/dns.png)",
        f"![scale]({charts}/scale.png)",
        f"![start-up]({charts}/startup.png)",
        f"![flood]({charts}/flood.png)",
        "",
    ]
    return "\n".join(lines) + "\n"


# --- charts -----------------------------------------------------------------------------------


def plain(value: float) -> str:
    """A number as a reader writes it: 62,341 rather than 6.23e+04, 8.77 rather than 8.7700."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value != int(value) or abs(value) < 10 else f"{value:.0f}"


def wrapped(names: list[str], width: int = 10) -> list[str]:
    """Tick labels wrapped onto lines of at most *width* characters, so neighbours do not overlap."""
    import textwrap

    return ["\n".join(textwrap.wrap(name, width)) for name in names]


def charts(r: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain_ticks = FuncFormatter(lambda v, _pos: plain(v))

    def axes_plain(*axes) -> None:
        for ax in axes:
            ax.yaxis.set_major_formatter(plain_ticks)

    def labelled(ax, bars, fontsize: float = 8, inside: bool = False) -> None:
        """Each bar's value: above it, or inside it where whiskers would cross the label."""
        labels = [plain(b.get_height()) for b in bars]
        if inside:
            ax.bar_label(bars, labels=labels, label_type="center", color="white", fontsize=fontsize, fontweight="bold")
        else:
            ax.bar_label(bars, labels=labels, padding=3, fontsize=fontsize)
            ax.margins(y=0.12)  # room for the labels above the highest bar

    c = r["costs"]
    variants = list(c["median"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), dpi=110)
    panels = (("p50_us", "round trip p50 (µs)"), ("flows_per_s", "new UDP flows (flows/s)"),
              ("tcp_gbit_s", "bulk TCP, iperf3 (Gbit/s)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        meds = [c["median"][v][key] for v in variants]
        lo = [m - min(x[key] for x in c["runs"][v]) for m, v in zip(meds, variants, strict=True)]
        hi = [max(x[key] for x in c["runs"][v]) - m for m, v in zip(meds, variants, strict=True)]
        # nswrap stands out, each datapath in its own colour
        colors = [{"nswrap": "tab:orange", "nswrap-bpf": "tab:green"}.get(v, "tab:blue") for v in variants]
        bars = ax.bar(range(len(variants)), meds, yerr=[lo, hi], capsize=4, color=colors)
        labelled(ax, bars, inside=True)
        ax.set_xticks(range(len(variants)), wrapped([NAMES[v] for v in variants]), fontsize=8)
        ax.set_title(label)
        ax.set_ylabel(label)
        axes_plain(ax)
    fig.suptitle("What nswrap costs (median of rounds, whiskers: min–max)")
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    plt.close(fig)

    d = r["dns"]
    variants = list(d["median"])
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    width = 0.38
    for j, k in enumerate(("few", "many")):
        xs = [i + (j - 0.5) * width for i in range(len(variants))]
        bars = ax.bar(xs, [d["median"][v][f"{k}_qps"] for v in variants], width, label=f"{d['clients'][k]} client sockets")
        labelled(ax, bars, fontsize=7)
    ax.set_xticks(range(len(variants)), wrapped([NAMES[v] for v in variants], 20), fontsize=8)
    ax.set_ylabel("DNS queries/s (dnsperf)")
    axes_plain(ax)
    ax.legend()
    ax.set_title("DNS max rate through eth1 (median of rounds)")
    fig.tight_layout()
    fig.savefig(out / "dns.png")
    plt.close(fig)

    sc = r["scale"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
    for v, style in (("nswrap", "-"), ("old", "--")):
        if v not in sc:
            continue
        pts = {int(k): p for k, p in sc[v]["points"].items() if k.isdigit()}
        xs = sorted(pts)
        for path, marker in (("wrapped", "o"), ("unrelated", "s")):
            a1.plot(xs, [pts[x]["p50_us"][path] for x in xs], style, marker=marker, label=f"{NAMES[v]}: {path}")
        starts = sc[v]["idle_start"]
        a2.plot([x["n"] for x in starts], [x["answered_ms"] for x in starts], style, marker=".", label=NAMES[v])
    a1.set_xlabel("other idle instances")
    a1.set_ylabel("round trip p50 (µs)")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.set_xlabel("k-th idle instance")
    a2.set_ylabel("launch → first answer (ms)")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    axes_plain(a1, a2)
    fig.tight_layout()
    fig.savefig(out / "scale.png")
    plt.close(fig)

    st = r["startup"]
    variants = list(st["median"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
    for j, k in enumerate(("v4_ms", "v6_ms")):
        xs = [i + (j - 0.5) * width for i in range(len(variants))]
        bars = a1.bar(xs, [st["median"][v][k] for v in variants], width, label="IPv4" if k == "v4_ms" else "IPv6")
        labelled(a1, bars, fontsize=7)
    a1.axhline(300, color="grey", linestyle=":", label="target 300 ms")
    a1.set_xticks(range(len(variants)), wrapped([NAMES[v] for v in variants]), fontsize=8)
    a1.set_ylabel("launch → first correct answer (ms)")
    a1.set_title("launch → first answer")
    a1.legend(fontsize=8)
    tv = list(st["true"])
    bars = a2.bar(range(len(tv)), [st["true"][v]["median_ms"] for v in tv])
    labelled(a2, bars)
    a2.set_xticks(range(len(tv)), wrapped([NAMES[v] for v in tv]), fontsize=8)
    a2.set_ylabel("start + stop (ms)")
    a2.set_title("start + stop of a server that exits at once (-- true)")
    axes_plain(a1, a2)
    fig.tight_layout()
    fig.savefig(out / "startup.png")
    plt.close(fig)

    fl = r["flood"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    for v, x in fl["runs"].items():
        for role, style in (("c2", "-"), ("c3", ":")):
            tl = x["clients"][role]["timeline"]
            a1.plot([t for t, _ in tl], [loss for _, loss in tl], style, label=f"{NAMES[v]}: {role}")
        a2.plot([t for t, _ in x["conntrack"]], [n for _, n in x["conntrack"]], label=NAMES[v])
    a1.set_xlabel("seconds since the flood began")
    a1.set_ylabel("legitimate queries lost (%)")
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)  # below: the curves stay clear
    a1.grid(alpha=0.3)
    a2.axhline(fl["max"], color="grey", linestyle=":", label="nf_conntrack_max")
    a2.set_xlabel("seconds since the flood began")
    a2.set_ylabel("conntrack entries (host namespace)")
    a2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    a2.grid(alpha=0.3)
    a1.set_title("legitimate clients during a flood")
    a2.set_title("conntrack table during the flood")
    axes_plain(a1, a2)
    fig.tight_layout()
    fig.savefig(out / "flood.png")
    plt.close(fig)


def main(argv: list[str]) -> int:
    partial, note = None, None
    if argv[:1] == ["--merge"]:
        if len(argv) < 2:
            raise SystemExit("usage: bench_report.py --merge PARTIAL [--note TEXT] [RESULTS_JSON [OUT_DIR]]")
        partial, argv = json.loads(pathlib.Path(argv[1]).read_text()), argv[2:]
        if argv[:1] == ["--note"] and len(argv) > 1:
            note, argv = argv[1], argv[2:]
    src = pathlib.Path(argv[0]) if argv else ROOT / "docs" / "bench" / "results.json"
    out = pathlib.Path(argv[1]) if len(argv) > 1 else src.parent
    r = json.loads(src.read_text())
    if partial is not None:
        r = merge(r, partial, note)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    (out / "results.md").write_text(results_md(r))
    charts(r, out)
    docs = ROOT / "docs" / "benchmarks.md" if out.resolve() == (ROOT / "docs" / "bench").resolve() else out / "benchmarks.md"
    docs.write_text(benchmarks_md(r, charts=os.path.relpath(out, docs.parent)))
    print(summary_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
