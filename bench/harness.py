"""Side-by-side benchmark of pyvirtiofsd, the Rust virtiofsd and QEMU's C virtiofsd.

    .venv/bin/python -m bench [--quick] [options]

Runs the same workloads against every daemon, interleaved (each workload runs on every
daemon before the next one starts, the daemon order rotating between repetitions), several
repetitions, with the machine's own limits measured in the same run.  Prints a table of
medians, ratios (pyvirtiofsd / Rust virtiofsd) and fractions of the machine's limits; writes
the raw results as JSON and a PNG chart into bench/results/.  It prints figures: nothing
passes or fails on speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import memory, report
from .daemons import BENCH, REPO, Daemon, all_daemons
from .limits import measure as measure_limits
from .workloads import (
    DATA_NAME,
    DATA_SIZE,
    DIR_ENTRIES,
    DIR_NAME,
    FRONTEND,
    QUEUE_SIZE,
    SCRATCH_NAME,
    WDATA_NAME,
    entry_name,
    measure,
)

QUICK = {"reps": 1, "seconds": 0.5, "warmup": 0.1, "guest": False}
FULL = {"reps": 3, "seconds": 2.0, "warmup": 0.3, "guest": True}
FIO_RUNTIME, FIO_RAMP = 3.0, 1.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_fixture(root: Path) -> None:
    """The tree every daemon shares: a 10,000-entry directory, a 64 MiB file to read, one to
    overwrite, and a scratch directory for the create cycles."""
    (root / DIR_NAME).mkdir(parents=True)
    for i in range(DIR_ENTRIES):
        (root / DIR_NAME / entry_name(i)).touch()
    block = os.urandom(1 << 20)
    for name in (DATA_NAME, WDATA_NAME):
        with open(root / name, "wb") as f:
            for _ in range(DATA_SIZE // len(block)):
                f.write(block)
    (root / SCRATCH_NAME).mkdir()


def warm(path: Path) -> None:
    """Read the file through so READs are served from the host's page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def clean(directory: Path) -> None:
    for p in directory.iterdir():
        p.unlink()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repetition, 0.5 s per figure, front-end level only")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--seconds", type=float, help="measured seconds per front-end figure")
    ap.add_argument("--daemons", default="py,rs,c",
                    help="comma-separated subset of py,rs,c (default all three)")
    ap.add_argument("--workloads", help="comma-separated workload keys (default all; --list)")
    ap.add_argument("--queues", default="1,2", help="request queue counts (default 1,2)")
    ap.add_argument("--no-guest", action="store_true", help="skip the QEMU guest workloads")
    ap.add_argument("--pyvirtiofsd", help="pyvirtiofsd executable (default: the venv's)")
    ap.add_argument("--poll-us", type=int, metavar="N",
                    help="also run pyvirtiofsd with --poll-us=N, as daemon 'py-poll' (add it "
                         "to --daemons; default: added when this is given)")
    ap.add_argument("--dirty-log", action="store_true",
                    help="front-end level with dirty-page logging on, as in a live migration")
    ap.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    ap.add_argument("--update-doc", action="store_true",
                    help="write the table into docs/benchmarks.md")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("--from-json", metavar="FILE",
                    help="measure nothing: print the table (and chart, doc) of a saved run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .guest import JOBS as GUEST_JOBS

    if args.list:
        for w in FRONTEND:
            print(f"{w.key:18} front-end  {w.title}")
        print(f"{memory.KEY:18} memory     PSS of every process: "
              + ", ".join(p.key for p in memory.PHASES))
        for j in GUEST_JOBS:
            print(f"{j.key:18} guest      {j.title}")
        return 0
    if args.from_json:
        saved = report.Results.load(Path(args.from_json))
        print(saved.table())
        outputs(saved, Path(args.from_json).with_suffix(""), args)
        return 0
    mode = dict(QUICK if args.quick else FULL)
    reps = args.reps or mode["reps"]
    seconds = args.seconds or mode["seconds"]
    warmup = mode["warmup"]
    if args.poll_us is not None and args.poll_us <= 0:
        log(f"--poll-us must be a positive number of microseconds, not {args.poll_us}")
        return 2
    daemons = all_daemons(args.pyvirtiofsd, args.poll_us)
    keys = [k.strip() for k in args.daemons.split(",") if k.strip()]
    if args.poll_us is not None and "py-poll" not in keys:
        keys.insert(keys.index("py") + 1 if "py" in keys else 0, "py-poll")
    if unknown := [k for k in keys if k not in daemons]:
        log(f"unknown daemon(s) {unknown}: use py, py-inflight, rs, c, py-fh, rs-fh (py-poll"
            " with --poll-us)")
        return 2
    chosen = [daemons[k] for k in keys]
    wanted = set(args.workloads.split(",")) if args.workloads else None
    known = {w.key for w in FRONTEND} | {j.key for j in GUEST_JOBS} | {memory.KEY}
    if wanted and (bad := wanted - known):
        log(f"unknown workload(s) {sorted(bad)}: see --list")
        return 2
    queues = [int(q) for q in args.queues.split(",")]
    frontend = [w for w in FRONTEND if not wanted or w.key in wanted]
    guest_jobs = [j for j in GUEST_JOBS if not wanted or j.key in wanted]
    run_memory = not wanted or memory.KEY in wanted
    run_guest = mode["guest"] and not args.no_guest and bool(guest_jobs)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="pyvfs-bench-", dir="/var/tmp"))
    results = report.Results(
        started=started.isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]),
        config={"reps": reps, "seconds": seconds, "warmup": warmup, "queues": queues,
                "queue_size": QUEUE_SIZE, "guest": run_guest, "fio_runtime": FIO_RUNTIME,
                "fio_ramp": FIO_RAMP, "quick": args.quick, "dirty_log": args.dirty_log},
        machine=report.machine_info(chosen),
        daemons={d.key: d.label for d in chosen},
    )
    for w in frontend:
        for q in queues:
            results.add_row(f"fe/{w.key}/q{q}", "front-end", f"{w.title}", w.unit, w.limit, q)
    if run_memory:
        for ph in memory.PHASES:
            results.add_row(f"{memory.KEY}/{ph.key}", "memory", ph.title, "MB", "none", 1)
        if memory.EXTRAPOLATED:
            ph = memory.EXTRAPOLATED
            results.add_row(f"{memory.KEY}/{ph.key}", "memory", ph.title, "MB", "none", 1)
    if run_guest:
        for j in guest_jobs:
            results.add_row(f"guest/{j.key}", "guest", j.title, j.unit, j.limit, 1)
    for d in chosen:
        if why := d.missing():
            for row in results.rows.values():
                row.na(d.key, why)
    try:
        share = tmp / "share"
        log(f"fixture: {share} ({DIR_ENTRIES:,} entries, 2 x {DATA_SIZE >> 20} MiB files)")
        make_fixture(share)
        if run_memory:
            log(f"memory fixture: {memory.BIG_ENTRIES:,} files in {memory.BIG_DIR}; "
                f"{memory.LOOKUPS:,} of them looked up")
            memory.make_big_dir(share)
        work = tmp / "work"
        work.mkdir()
        limit_s = 0.3 if args.quick else 1.0
        results.limits.append(measure_limits(out_dir / ".build", limit_s))
        log(f"machine limits: {results.limits[-1]}")
        t_start = time.monotonic()
        for rep in range(reps):
            order = chosen[rep % len(chosen):] + chosen[: rep % len(chosen)]
            warm(share / DATA_NAME)
            for w in frontend:
                for q in queues:
                    row = results.rows[f"fe/{w.key}/q{q}"]
                    for d in order:
                        if d.key in row.na_reasons:
                            continue
                        if q > d.max_queues:
                            row.na(d.key, "serves one request queue")
                            continue
                        clean(share / SCRATCH_NAME)
                        try:
                            m = measure(d, w, q, str(share), str(work), seconds, warmup,
                                        args.dirty_log)
                        except Exception as e:   # one failure must not end the run
                            row.fail(d.key, str(e))
                            log(f"[{rep + 1}/{reps}] {row.key} {d.label}: FAILED "
                                f"{str(e).splitlines()[0]}")
                            continue
                        row.add(d.key, m["value"], int(m["glitches"]), m["cpu_us"])
                        log(f"[{rep + 1}/{reps}] {row.key:24} {d.label:15} "
                            f"{report.fmt(m['value']):>9} {w.unit:9} daemon CPU "
                            f"{m['cpu_us']:6.1f} µs/request"
                            + (f"  ({m['glitches']} used.idx glitches)"
                               if m["glitches"] else ""))
            if run_memory:
                measure_memory(results, order, rep, reps, share, work)
            results.limits.append(measure_limits(out_dir / ".build", limit_s))
        log(f"front-end level done in {time.monotonic() - t_start:.0f} s")
        if run_guest:
            run_guest_level(results, chosen, guest_jobs, tmp / "gshare", reps,
                            out_dir / f"bench-{stamp}-logs")
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results.finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    base = out_dir / f"bench-{stamp}"
    results.write_json(base.with_suffix(".json"))
    print(results.table())
    outputs(results, base, args)
    return 0


def measure_memory(results: report.Results, order: list[Daemon], rep: int, reps: int,
                   share: Path, work: Path) -> None:
    """One fresh daemon per daemon kind through memory.PHASES; every process's PSS kept."""
    rows = [results.rows[f"{memory.KEY}/{ph.key}"] for ph in memory.PHASES]
    for d in order:
        if d.key in rows[0].na_reasons:
            continue
        try:
            m = memory.measure(d, str(share), str(work))
        except Exception as e:
            m = getattr(e, "partial", {})
            for row in rows[len(m):] if m else rows:
                row.fail(d.key, str(e))
            log(f"[{rep + 1}/{reps}] memory {d.label}: FAILED {str(e).splitlines()[0]}")
            if not m:
                continue
        for ph, row in zip(memory.PHASES, rows, strict=True):
            if ph.key not in m:
                continue
            s = dict(m[ph.key])
            total = s.pop("total")
            row.add(d.key, total * 1024 / 1e6)
            row.procs.setdefault(d.key, []).append(s)
        if memory.EXTRAPOLATED and "lookup" in m:
            results.rows[f"{memory.KEY}/{memory.EXTRAPOLATED.key}"].add(
                d.key, memory.extrapolate(m) * 1024 / 1e6)
        log(f"[{rep + 1}/{reps}] memory {d.label:15} "
            + ", ".join(f"{ph.key} {m[ph.key]['total'] * 1024 / 1e6:.1f} MB"
                        for ph in memory.PHASES if ph.key in m)
            + f" PSS over {len(m['idle']) - 1} process(es)")


def outputs(results: report.Results, base: Path, args: argparse.Namespace) -> None:
    """BASE.json (already written), BASE.md, BASE.png and, if asked, the doc section."""
    base.with_suffix(".md").write_text(results.table())
    written = [base.with_suffix(".json"), base.with_suffix(".md")]
    if not args.no_chart:
        if why := results.chart(base.with_suffix(".png")):
            log(f"no chart: {why}")
        else:
            written.append(base.with_suffix(".png"))
    if args.update_doc:
        report.update_doc(REPO / "docs" / "benchmarks.md", results)
        written.append(REPO / "docs" / "benchmarks.md")
    log("wrote " + ", ".join(str(p) for p in written))


def run_guest_level(results: report.Results, chosen: list[Daemon], jobs, share: Path,
                    reps: int, log_dir: Path) -> None:
    from .guest import GuestBench, unavailable

    rows = [results.rows[f"guest/{j.key}"] for j in jobs]
    if why := unavailable():
        for row in rows:
            for d in chosen:
                row.na(d.key, why)
        return
    t_start = time.monotonic()
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        gb = GuestBench(str(share), FIO_RUNTIME, FIO_RAMP, log, log_dir)
    except Exception as e:
        for row in rows:
            for d in chosen:
                row.na(d.key, f"guest set-up failed: {str(e).splitlines()[0]}")
        log(f"guest level skipped: {e}")
        return
    for rep in range(reps):
        order = chosen[rep % len(chosen):] + chosen[: rep % len(chosen)]
        for d in order:
            if d.missing():
                continue
            t0 = time.monotonic()
            try:
                values = gb.run(d)
            except Exception as e:
                for row in rows:
                    row.fail(d.key, str(e))
                log(f"[{rep + 1}/{reps}] guest {d.label}: FAILED {str(e).splitlines()[0]}")
                continue
            for row, j in zip(rows, jobs, strict=True):
                v = values.get(j.key, "no result")
                if isinstance(v, str):
                    row.fail(d.key, v)
                else:
                    row.add(d.key, v, 0)
            shown = ", ".join(f"{k}={report.fmt(v) if not isinstance(v, str) else 'n/a'}"
                              for k, v in values.items() if k != "log")
            if "log" in values:
                shown += f"; console and daemon output in {values['log']}"
            log(f"[{rep + 1}/{reps}] guest {d.label} ({time.monotonic() - t0:.0f} s): {shown}")
    log(f"guest level done in {time.monotonic() - t_start:.0f} s")

