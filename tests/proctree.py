"""The daemon's process tree and fd counts, read from /proc."""

from __future__ import annotations

import os


def children(pid: int) -> dict[int, str]:
    """{pid: comm} of every live process whose parent is `pid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: it ends at the last ')'.
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out[int(entry)] = stat[stat.index("(") + 1 : stat.rindex(")")]
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
