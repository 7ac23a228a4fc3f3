"""Before/after table of two bench runs (their JSON files), for docs/benchmarks.md.

    .venv/bin/python -m bench.compare BEFORE.json AFTER.json [--memory-before FILE]
        [--memory-after FILE] [--also AFTER2.json] [--label-before TEXT] [--label-after TEXT]

Every row that either run measured, pyvirtiofsd's median before and after, the Rust
virtiofsd's median in each run, and the ratio pyvirtiofsd / Rust of each run (the Rust daemon
is measured in the same run, interleaved, so each ratio compares figures taken under the same
load).  Then the daemon CPU per request the same way, and the memory rows (lower is better).
The memory rows may come from other runs (`--memory-*`, e.g. `--workloads memory`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from .report import Results, Row, fmt


def _med(row: Row | None, daemon: str) -> float | None:
    return row.median(daemon) if row is not None else None


def _cpu(row: Row | None, daemon: str) -> float | None:
    if row is None or not row.cpu_us.get(daemon):
        return None
    return statistics.median(row.cpu_us[daemon])


def _rust(res: Results, row: Row | None) -> float | None:
    return res.rust_reference(row)[0] if row is not None else None


def _f(v: float | None) -> str:
    return fmt(v) if v is not None else "n/a"


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if a is not None and b else "n/a"


def describe(res: Results, label: str) -> str:
    m = res.machine
    return (f"{label}: {m.get('pyvirtiofsd', '?')}, run {res.started}, `{res.command}`, "
            f"load average at the start {m.get('loadavg_at_start', '?')}")


def table(before: Results, after: Results, mem_before: Results | None,
          mem_after: Results | None, also: Results | None = None) -> str:
    """`also`: another after run, whose ratios to the Rust virtiofsd get a column of their own
    (how much a ratio moves between two runs)."""
    keys = list(dict.fromkeys([*before.rows, *after.rows]))
    fe = [k for k in keys if k.startswith("fe/")]
    extra = " | ratio, other after run |" if also else " |"
    out = ["| Workload | Queues | Unit | pyvirtiofsd before | Rust (before run) | ratio before "
           "| pyvirtiofsd after | Rust (after run) | ratio after | after / before" + extra,
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if also else "")]
    for k in fe:
        b, a = before.rows.get(k), after.rows.get(k)
        r = a or b
        pb, pa = _med(b, "py"), _med(a, "py")
        rb, ra = _rust(before, b), _rust(after, a)
        star = "*" if r.queues > 1 else ""
        lim = after.limit_of(r.limit) if r.limit == "memcpy" else None
        pa_cell = _f(pa) + (f" ({pa / lim:.0%} of memcpy)" if lim and pa else "")
        cell = ""
        if also:
            o = also.rows.get(k)
            cell = f" {_ratio(_med(o, 'py'), _rust(also, o))}{star} |"
        out.append(f"| {r.title} | {r.queues} | {r.unit} | {_f(pb)} | {_f(rb)} | "
                   f"{_ratio(pb, rb)}{star} | {pa_cell} | {_f(ra)} | {_ratio(pa, ra)}{star} | "
                   f"{_ratio(pa, pb)} |" + cell)
    out += ["", "Daemon CPU time per request (µs, median; lower is better):", "",
            "| Workload | Queues | pyvirtiofsd before | Rust (before run) | ratio before "
            "| pyvirtiofsd after | Rust (after run) | ratio after" + extra,
            "|---|---|---|---|---|---|---|---|" + ("---|" if also else "")]
    for k in fe:
        b, a = before.rows.get(k), after.rows.get(k)
        r = a or b
        if r.queues > 1:
            continue          # the Rust virtiofsd serves one queue: no CPU figure to compare
        pb, pa = _cpu(b, "py"), _cpu(a, "py")
        rb, ra = _cpu(b, "rs"), _cpu(a, "rs")
        cell = ""
        if also:
            o = also.rows.get(k)
            cell = f" {_ratio(_cpu(o, 'py'), _cpu(o, 'rs'), 1)} |"
        out.append(f"| {r.title} | {r.queues} | {_f(pb)} | {_f(rb)} | {_ratio(pb, rb, 1)} | "
                   f"{_f(pa)} | {_f(ra)} | {_ratio(pa, ra, 1)} |" + cell)
    mb, ma = mem_before or before, mem_after or after
    mem = list(dict.fromkeys([k for k in [*mb.rows, *ma.rows] if k.startswith("memory/")]))
    if mem:
        out += ["", "Daemon memory, PSS summed over every process (MB; lower is better):", "",
                "| Phase | pyvirtiofsd before | Rust (before run) | ratio before "
                "| pyvirtiofsd after | Rust (after run) | ratio after |",
                "|---|---|---|---|---|---|---|"]
        for k in mem:
            b, a = mb.rows.get(k), ma.rows.get(k)
            r = a or b
            pb, pa = _med(b, "py"), _med(a, "py")
            rb, ra = _med(b, "rs"), _med(a, "rs")
            out.append(f"| {r.title} | {_f(pb)} | {_f(rb)} | {_ratio(pb, rb)} | {_f(pa)} | "
                       f"{_f(ra)} | {_ratio(pa, ra)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--memory-before")
    ap.add_argument("--memory-after")
    ap.add_argument("--also", metavar="AFTER2.json",
                    help="another after run: its ratios to the Rust virtiofsd in a column")
    ap.add_argument("--label-before", default="Before")
    ap.add_argument("--label-after", default="After")
    args = ap.parse_args(argv)
    before, after = Results.load(Path(args.before)), Results.load(Path(args.after))
    mb = Results.load(Path(args.memory_before)) if args.memory_before else None
    ma = Results.load(Path(args.memory_after)) if args.memory_after else None
    also = Results.load(Path(args.also)) if args.also else None
    print(describe(before, args.label_before))
    print(describe(after, args.label_after))
    for label, res in ((f"{args.label_before} (memory)", mb), (f"{args.label_after} (memory)",
                                                                 ma), ("Other after run", also)):
        if res is not None:
            print(describe(res, label))
    print()
    print(table(before, after, mb, ma, also))
    return 0


if __name__ == "__main__":
    sys.exit(main())
