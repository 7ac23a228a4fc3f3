"""UID/GID translation between guest and host (virtiofsd's --translate-uid / --translate-gid).

A rule is `TYPE<sep>A<sep>B<sep>COUNT` (forbid-guest: `TYPE<sep>A<sep>COUNT`), where the
separator is any one character that is neither alphanumeric nor '-' or '_', the same for every
field.  The types, as virtiofsd 1.13 defines them:

    guest:G:H:N          guest ids [G, G+N) -> host ids [H, H+N)        (guest to host only)
    host:H:G:N           host ids [H, H+N) -> guest ids [G, G+N)        (host to guest only)
    squash-guest:G:H:N   guest ids [G, G+N) -> the one host id H
    squash-host:H:G:N    host ids [H, H+N) -> the one guest id G
    map:G:H:N            both directions, 1:1
    forbid-guest:G:N     guest ids [G, G+N) may not own anything on the host

Ids no rule covers map to themselves.  The two directions are independent: rules of one
direction must not overlap each other (virtiofsd refuses to start otherwise).

Pure data, no I/O: the supervisor validates rules with it, workers translate with it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass

_ID_END = 1 << 32
# The kernel's overflow ids (/proc/sys/fs/overflow{u,g}id): what an id with no mapping acts as.
OVERFLOW_ID = 65534


class IdMapError(ValueError):
    """A rule that cannot be parsed or combined; the message is virtiofsd's."""


class ForbiddenId(PermissionError):
    """A guest id a forbid-guest rule covers, used where it would own something on the host."""


_FIELDS = {"guest": 3, "host": 3, "squash-guest": 3, "squash-host": 3, "forbid-guest": 2,
           "map": 3}
_U32 = re.compile(r"\+?[0-9]+")


def _parse_u32(value: str) -> int:
    # Rust's u32::from_str, with its error texts (virtiofsd prints them).
    if not value:
        raise IdMapError(f"Invalid value {value} in ID map: cannot parse integer from empty "
                         "string")
    if not _U32.fullmatch(value) or value == "+":
        raise IdMapError(f"Invalid value {value} in ID map: invalid digit found in string")
    n = int(value)
    if n >= _ID_END:
        raise IdMapError(f"Invalid value {value} in ID map: number too large to fit in target "
                         "type")
    return n


@dataclass(frozen=True)
class Rule:
    kind: str
    fields: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Rule:
        """One rule, or IdMapError with virtiofsd's message."""
        prefix = []
        sep = None
        for i, c in enumerate(text):
            if c.isalnum() or c in "-_":
                prefix.append(c.lower())
            else:
                sep, rest = c, text[i + 1:]
                break
        if sep is None:
            raise IdMapError("Invalid ID map length (expected 1 elements, got 0 elements)")
        values = [_parse_u32(v) for v in rest.split(sep)]
        kind = "".join(prefix)
        if kind not in _FIELDS:
            raise IdMapError(f"Invalid ID map prefix {kind}")
        if len(values) != _FIELDS[kind]:
            raise IdMapError(f"Invalid ID map length (expected {_FIELDS[kind]} elements, "
                             f"got {len(values)} elements)")
        return cls(kind, tuple(values))

    def __str__(self) -> str:
        return ":".join([self.kind, *map(str, self.fields)])


@dataclass(frozen=True)
class _Entry:
    start: int
    end: int          # exclusive
    target: int       # base (range) or the single id (squash); -1: forbidden
    squash: bool

    def describe(self) -> str:
        if self.target < 0:
            return f"fail [{self.start}, {self.end})"
        if self.squash:
            return f"squash [{self.start}, {self.end}) to {self.target}"
        return (f"map [{self.start}, {self.end}) to [{self.target}, "
                f"{self.target + self.end - self.start})")


class _Direction:
    """Non-overlapping ranges of one direction, looked up by bisection."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: list[_Entry] = []
        self._starts: list[int] = []

    def add(self, entry: _Entry, rule: Rule) -> None:
        i = bisect.bisect_right(self._starts, entry.start)
        before = self.entries[i - 1] if i else None
        after = self.entries[i] if i < len(self.entries) else None
        if entry.start < entry.end and (
                (before is not None and before.end > entry.start)
                or (after is not None and after.start < entry.end)):
            raise IdMapError(f"{rule}: {self.name} mapping '{entry.describe()}' intersects "
                             "previously added entry")
        if entry.start < entry.end:
            self.entries.insert(i, entry)
            self._starts.insert(i, entry.start)

    def find(self, ident: int) -> _Entry | None:
        i = bisect.bisect_right(self._starts, ident) - 1
        if i >= 0 and ident < self.entries[i].end:
            return self.entries[i]
        return None


class IdMap:
    """The translation of one kind of id (uids or gids) in both directions."""

    def __init__(self, rules: Iterable[str] = (), what: str = "UID") -> None:
        self.rules = tuple(Rule.parse(r) for r in rules)
        self._g2h = _Direction("Guest-to-host")
        self._h2g = _Direction("Host-to-guest")
        for rule in self.rules:
            try:
                self._add(rule)
            except IdMapError as e:
                raise IdMapError(f"{what} map: {e}") from None

    def _add(self, rule: Rule) -> None:
        f = rule.fields
        if rule.kind == "forbid-guest":
            # virtiofsd adds no overflow check here; the end is clamped to the id space.
            self._g2h.add(_Entry(f[0], min(f[0] + f[1], _ID_END), -1, False), rule)
            return
        if f[0] + f[2] >= _ID_END:
            raise IdMapError(f"Parameter {rule}: Range overflow")
        entry = _Entry(f[0], f[0] + f[2], f[1], rule.kind.startswith("squash"))
        if rule.kind in ("guest", "squash-guest", "map"):
            self._g2h.add(entry, rule)
        if rule.kind in ("host", "squash-host"):
            self._h2g.add(entry, rule)
        if rule.kind == "map":
            self._h2g.add(_Entry(f[1], f[1] + f[2], f[0], False), rule)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def to_host(self, guest_id: int) -> int:
        """The host id for a guest id; ForbiddenId for one a forbid-guest rule covers."""
        e = self._g2h.find(guest_id)
        if e is None:
            return guest_id
        if e.target < 0:
            raise ForbiddenId(f"use of guest id {guest_id} has been configured to fail")
        return e.target if e.squash else e.target + guest_id - e.start

    def to_host_or_overflow(self, guest_id: int) -> int:
        """to_host(), with a forbidden id acting as the overflow id (nobody)."""
        try:
            return self.to_host(guest_id)
        except ForbiddenId:
            return OVERFLOW_ID

    def to_guest(self, host_id: int) -> int:
        e = self._h2g.find(host_id)
        if e is None:
            return host_id
        return e.target if e.squash else e.target + host_id - e.start


def check_rules(rules: Iterable[str], what: str) -> None:
    """IdMapError for a rule set virtiofsd would refuse."""
    IdMap(rules, what)
