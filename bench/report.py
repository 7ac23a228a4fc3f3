"""Results of one bench run: medians, ratios, fractions of the machine's limits; table,
JSON, chart and the docs/benchmarks.md section."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

DOC_BEGIN = "<!-- bench-results:begin -->"
DOC_END = "<!-- bench-results:end -->"


def fmt(v: float) -> str:
    """Three significant digits with thousands separators: 27,100 / 412 / 3.51."""
    if v == 0:
        return "0"
    exp = math.floor(math.log10(abs(v)))
    if exp >= 2:
        return f"{round(v, -(exp - 2)):,.0f}"
    return f"{v:.{2 - exp}f}"


def pct(f: float) -> str:
    p = f * 100
    return f"{p:.2g}%" if p < 10 else f"{p:.0f}%"


@dataclass
class Row:
    key: str
    level: str
    title: str
    unit: str
    limit: str               # "syscall" | "memcpy"
    queues: int
    values: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)   # daemon CPU per request
    glitches: dict[str, int] = field(default_factory=dict)
    na_reasons: dict[str, str] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    # memory rows: each measurement's {"comm[pid]": PSS KiB} of every process of the daemon
    procs: dict[str, list[dict[str, int]]] = field(default_factory=dict)

    def add(self, daemon: str, value: float, glitches: int = 0,
            cpu_us: float | None = None) -> None:
        self.values.setdefault(daemon, []).append(value)
        self.glitches[daemon] = self.glitches.get(daemon, 0) + glitches
        if cpu_us is not None:
            self.cpu_us.setdefault(daemon, []).append(cpu_us)

    def na(self, daemon: str, why: str) -> None:
        self.na_reasons[daemon] = why

    def fail(self, daemon: str, why: str) -> None:
        self.failures.setdefault(daemon, []).append(why)

    def median(self, daemon: str) -> float | None:
        v = self.values.get(daemon)
        return statistics.median(v) if v else None


@dataclass
class Results:
    started: str
    command: str
    config: dict
    machine: dict
    daemons: dict[str, str]                      # key -> label, in column order
    limits: list[dict[str, float]] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)
    finished: str = ""

    def add_row(self, key: str, level: str, title: str, unit: str, limit: str,
                queues: int) -> None:
        self.rows[key] = Row(key, level, title, unit, limit, queues)

    # -- derived figures

    def limit_of(self, kind: str) -> float | None:
        """The machine's limit in a row's unit: memcpy MB/s, or bare syscalls per second."""
        if not self.limits or kind not in ("memcpy", "syscall"):
            return None
        if kind == "memcpy":
            return statistics.median(m["memcpy_mb_s"] for m in self.limits)
        return 1e9 / statistics.median(m["syscall_ns"] for m in self.limits)

    def rust_reference(self, row: Row) -> tuple[float | None, bool]:
        """The Rust figure a row is compared with, and whether it is the 1-queue one (the
        Rust virtiofsd serves one request queue, so 2-queue rows compare with that)."""
        rs = row.median("rs")
        if rs is None and row.queues > 1:
            one = self.rows.get(re.sub(r"/q\d+$", "/q1", row.key))
            if one is not None and one.median("rs") is not None:
                return one.median("rs"), True
        return rs, False

    def summary(self) -> dict:
        out = {}
        for key, row in self.rows.items():
            lim = self.limit_of(row.limit)
            med = {d: row.median(d) for d in self.daemons}
            py, (rs, one_queue) = med.get("py"), self.rust_reference(row)
            out[key] = {
                "median": med,
                "fraction_of_limit": {d: (m / lim if m is not None and lim else None)
                                      for d, m in med.items()},
                "ratio_py_rust": py / rs if py is not None and rs else None,
                "ratio_against_rust_1_queue": one_queue,
            }
        return out

    @classmethod
    def load(cls, path: Path) -> Results:
        """A run written by write_json (to re-render its table, chart or doc section)."""
        data = json.loads(path.read_text())
        for k in ("summary", "limits_median"):
            data.pop(k, None)
        rows = {k: Row(**v) for k, v in data.pop("rows").items()}
        return cls(**data, rows=rows)

    # -- outputs

    def write_json(self, path: Path) -> None:
        data = asdict(self)
        data["summary"] = self.summary()
        data["limits_median"] = {k: statistics.median(m[k] for m in self.limits)
                                 for k in (self.limits[0] if self.limits else {})}
        path.write_text(json.dumps(data, indent=1) + "\n")

    def _cell(self, row: Row, daemon: str, lim: float | None) -> str:
        m = row.median(daemon)
        if m is None:
            why = row.na_reasons.get(daemon) or (
                "failed: " + row.failures[daemon][0].splitlines()[0]
                if daemon in row.failures else "not run")
            return f"n/a ({_short(why)})"
        cell = fmt(m) + (f" ({pct(m / lim)})" if lim else "")
        if row.procs.get(daemon):
            n = statistics.median(len(p) for p in row.procs[daemon])
            cell += f" ({n:g} process{'es' if n != 1 else ''})"
        n_fail = len(row.failures.get(daemon, []))
        if n_fail:
            cell += f" [{n_fail} failed]"
        return cell

    def table(self) -> str:
        lines = [self.limits_line(), ""]
        labels = list(self.daemons.values())
        for level, heading in (("front-end", "Front-end driver level (daemon-bound)"),
                               ("memory", "Daemon memory: PSS summed over every process of "
                                          "the daemon (MB = 10^6 bytes; lower is better)"),
                               ("guest", "QEMU guest level (TCG, 1 vCPU)")):
            rows = [r for r in self.rows.values() if r.level == level]
            if not rows:
                continue
            lines += [f"**{heading}**", ""]
            head = ["Workload", "Queues", "Unit", *labels]
            if "py" in self.daemons and "rs" in self.daemons:
                head.append("pyvirtiofsd / Rust")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" for _ in head) + "|")
            for r in rows:
                lim = self.limit_of(r.limit)
                cells = [r.title, str(r.queues), r.unit,
                         *(self._cell(r, d, lim) for d in self.daemons)]
                if len(head) > len(cells):
                    py, (rs, one_queue) = r.median("py"), self.rust_reference(r)
                    cells.append(f"{py / rs:.2f}{'*' if one_queue else ''}"
                                 if py is not None and rs else "n/a")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        cpu_rows = [r for r in self.rows.values() if r.cpu_us]
        if cpu_rows:
            lines += ["**Daemon CPU time per request** (µs, median; every process and thread "
                      "of the daemon, FORGETs counted as requests)", ""]
            head = ["Workload", "Queues", *labels]
            if "py" in self.daemons and "rs" in self.daemons:
                head.append("pyvirtiofsd / Rust")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" for _ in head) + "|")
            for r in cpu_rows:
                med = {d: statistics.median(r.cpu_us[d]) if r.cpu_us.get(d) else None
                       for d in self.daemons}
                cells = [r.title, str(r.queues),
                         *(fmt(m) if m is not None else "n/a" for m in med.values())]
                if len(head) > len(cells):
                    py, rs = med.get("py"), med.get("rs")
                    cells.append(f"{py / rs:.1f}" if py is not None and rs else "n/a")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        notes = self.notes()
        if any(self.rust_reference(r)[1] for r in self.rows.values()):
            notes.insert(0, "\\* against the Rust virtiofsd's 1-queue figure: it serves one "
                            "request queue.")
        if notes:
            lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
        return "\n".join(lines).rstrip() + "\n"

    def limits_line(self) -> str:
        if not self.limits:
            return "Machine limits: not measured."
        m = {k: statistics.median(x[k] for x in self.limits) for k in self.limits[0]}
        return (f"Machine limits (median of {len(self.limits)} measurements in this run): "
                f"memcpy between two mappings {fmt(m['memcpy_mb_s'])} MB/s; bare syscall "
                f"round trip {m['syscall_ns']:.0f} ns (= {fmt(1e9 / m['syscall_ns'])} per "
                f"second); eventfd wake-up round trip between two processes "
                f"{m['wakeup_rtt_us']:.1f} µs.  Percentages: each median as a fraction of its "
                f"limit (MB/s of memcpy, anything per second of bare syscalls)."
                + self.kernel_copy_sentence(m))

    @staticmethod
    def kernel_copy_sentence(m: dict[str, float]) -> str:
        """The kernel's own copy of a 1 MiB READ / WRITE chain, where the run measured it (runs
        saved before it was measured have none)."""
        if "preadv_mb_s" not in m or "pwritev_mb_s" not in m:
            return ""
        return (f"  For reference, the kernel's own copy of a 1 MiB chain of 4 KiB pages "
                f"between the share's page cache and such a mapping: preadv "
                f"{fmt(m['preadv_mb_s'])} MB/s, pwritev {fmt(m['pwritev_mb_s'])} MB/s (what a "
                f"READ or WRITE cannot beat, whatever the daemon).")

    def notes(self) -> list[str]:
        """Failed runs of figures that still have a median, grouped by daemon and reason."""
        out = []
        groups: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
        for r in self.rows.values():
            for d, fails in r.failures.items():
                if not r.values.get(d):
                    continue        # the cell itself says n/a and why
                total = len(fails) + len(r.values[d])
                for reason in dict.fromkeys(f.splitlines()[0] for f in fails):
                    n = sum(1 for f in fails if f.splitlines()[0] == reason)
                    groups.setdefault((d, reason), []).append((r.title, n, total))
        for (d, reason), items in groups.items():
            n, total = max(i[1] for i in items), max(i[2] for i in items)
            titles = "; ".join(i[0] for i in items)
            out.append(f"{self.daemons[d]}: {n} of {total} runs gave no figure "
                       f"({_short(reason, 120)}) for: {titles}.  The median is of the others.")
        for r in self.rows.values():
            for d, g in r.glitches.items():
                if g:
                    out.append(f"{r.title} (q{r.queues}), {self.daemons[d]}: the driver saw "
                               f"{g} impossible used.idx value(s) (re-read until consistent)")
        return out

    def chart(self, path: Path) -> str:
        """Writes the PNG; returns why not ('' when written)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.ticker import FuncFormatter, NullFormatter
        except ImportError:
            return "matplotlib is not installed (pip install '.[bench]')"
        rows = [r for r in self.rows.values() if r.level != "memory"]
        labels = [f"{'guest: ' if r.level == 'guest' else ''}{r.title}"
                  + (f" [{r.queues} queues{'*' if self.rust_reference(r)[1] else ''}]"
                     if r.queues > 1 else "") for r in rows]
        keys = list(self.daemons)
        colors = {"py": "#3572A5", "rs": "#DEA584", "c": "#555555"}
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 0.32 * len(rows) + 2.2),
                                       sharey=True)
        height = 0.8 / max(1, len(keys))
        has_rel = has_frac = False
        for i, d in enumerate(keys):
            rel, frac, ys = [], [], []
            for y, r in enumerate(rows):
                m, (rs, _one) = r.median(d), self.rust_reference(r)
                lim = self.limit_of(r.limit)
                ys.append(y + (i - (len(keys) - 1) / 2) * height)
                rel.append(m / rs if m is not None and rs else 0)
                frac.append(100 * m / lim if m is not None and lim else 0)
            ax1.barh(ys, rel, height, label=self.daemons[d], color=colors.get(d))
            ax2.barh(ys, frac, height, label=self.daemons[d], color=colors.get(d))
            has_rel, has_frac = has_rel or any(rel), has_frac or any(frac)
        if not (has_rel or has_frac):
            plt.close(fig)
            return "no figure to plot"
        ax1.set_yticks(range(len(rows)), labels, fontsize=8)
        ax1.invert_yaxis()
        if has_rel:             # a log axis needs one positive value
            ax1.set_xscale("log")
        ax1.axvline(1.0, color="black", lw=0.8)
        ax1.set_xlabel("median relative to the Rust virtiofsd (log scale; no bar: n/a;\n"
                       "* against its 1-queue figure)")
        if has_frac:
            ax2.set_xscale("log")
        plain = FuncFormatter(lambda x, _pos: f"{x:g}")
        for ax in (ax1, ax2):
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(axis="x", which="major", lw=0.3)
        ax2.set_xlabel("% of the machine's limit (memcpy MB/s or bare syscalls/s, log scale)")
        handles, names = ax1.get_legend_handles_labels()
        fig.legend(handles, names, loc="upper right", ncol=len(keys), fontsize=8)
        fig.suptitle(f"pyvirtiofsd vs Rust and C virtiofsd — {self.started} — "
                     f"{self.machine.get('cpu', '')}", fontsize=10, x=0.02, ha="left")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return ""


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_info(daemons) -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
        with open("/proc/meminfo") as f:
            mem_kib = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        mem_kib = 0
    os_name = "?"
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.M)
            os_name = m.group(1) if m else os_name
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "qemu": _version(["qemu-system-x86_64", "--version"]),
        # Other work on the machine skews every figure: say how busy it was.
        "loadavg_at_start": round(os.getloadavg()[0], 2),
    }
    for d in daemons:
        if d.key == "py":
            info["pyvirtiofsd"] = _version([d.exe, "-V"])
            # The checkout an editable install runs from (.venv/bin/pyvirtiofsd -> checkout).
            commit = _version(["git", "-C", str(Path(d.exe).resolve().parents[2]), "describe",
                               "--always", "--dirty", "--exclude=*"])
            if re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", commit):
                info["pyvirtiofsd"] += f" (commit {commit})"
        elif d.key == "rs":
            info["rust_virtiofsd"] = "Rust " + _version([d.exe, "--version"])
        elif d.key == "c":
            info["c_virtiofsd"] = "C " + _version([d.exe, "-V"])
    return info


def update_doc(path: Path, results: Results) -> None:
    """Replace the generated section of docs/benchmarks.md with this run's."""
    text = path.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise RuntimeError(f"{path} has no {DOC_BEGIN} ... {DOC_END} section")
    m = results.machine
    daemons = "; ".join(m[k] for k in ("pyvirtiofsd", "rust_virtiofsd", "c_virtiofsd")
                        if k in m)
    cfg = results.config
    body = "\n".join([
        DOC_BEGIN,
        f"Run {results.started} to {results.finished}: `{results.command}` "
        f"({cfg['reps']} repetitions, {cfg['seconds']:g} s per front-end figure"
        + (f", fio {cfg['fio_runtime']:g} s per job" if cfg["guest"] else "") + ").",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['os']}, "
        f"Linux {m['kernel']}, Python {m['python']}, {m['qemu']}.  Daemons: {daemons}.  "
        f"Load average when the run started: {m.get('loadavg_at_start', '?')} "
        f"(anything above 0 was other work sharing the two cores).",
        "",
        results.table().rstrip(),
        DOC_END,
    ])
    start = text.index(DOC_BEGIN)
    end = text.index(DOC_END) + len(DOC_END)
    path.write_text(text[:start] + body + text[end:])
