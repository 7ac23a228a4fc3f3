"""Extended attribute name mapping (virtiofsd's --xattrmap and its rule language).

A map is a list of rules separated by whitespace; each rule's first character is its own
delimiter:

    :TYPE:SCOPE:KEY:PREPEND:     TYPE prefix, ok, bad or unsupported; SCOPE client, server, all
    :map:KEY:PREPEND:            shorthand, only as the last rule

A name from the guest (GETXATTR, SETXATTR, REMOVEXATTR) takes the first `client`-scoped rule
whose KEY is a prefix of it: `prefix` sends PREPEND + name to the host, `ok` the name itself,
`bad` refuses it (EPERM), `unsupported` too (ENOTSUP).  A name from the host (LISTXATTR) takes
the first `server`-scoped rule whose PREPEND is a prefix of it: `prefix` strips PREPEND, `ok`
shows it, `bad` and `unsupported` hide it.  `:map:KEY:PREPEND:` stands for
`:prefix:all:KEY:PREPEND:`, then (KEY not empty) `:bad:all:PREPEND:KEY:` and `:ok:all:::`, or
(KEY empty) `:bad:all:::`.  A name no rule matches is refused (EPERM) or hidden: a map lets
through only what it names, so it never turns raw passthrough on by itself.

Pure data, no I/O: the supervisor validates maps with it, workers apply them.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass


class XattrMapError(ValueError):
    """A malformed map; the message names the rule (1-based) and what is wrong."""


class Kind(enum.Enum):
    PREFIX = "prefix"
    OK = "ok"
    BAD = "bad"
    UNSUPPORTED = "unsupported"
    MAP = "map"


SCOPES = {"all": (True, True), "client": (True, False), "server": (False, True)}


@dataclass(frozen=True)
class Rule:
    kind: Kind
    client: bool
    server: bool
    key: bytes
    prepend: bytes


def _fields(text: str, pos: int, number: int) -> tuple[list[str], int]:
    """The fields of the rule starting at text[pos] (its delimiter), and where it ends."""
    delim = text[pos]
    end = pos + 1
    fields: list[str] = []
    want = 3
    while len(fields) < want:
        nxt = text.find(delim, end)
        if nxt < 0:
            raise XattrMapError(f"xattrmap rule {number} is incomplete")
        fields.append(text[end:nxt])
        end = nxt + 1
        if len(fields) == 1:
            if fields[0] not in Kind._value2member_map_:
                raise XattrMapError(f"xattrmap rule {number}: invalid type {fields[0]!r} "
                                    f"(expected {', '.join(k.value for k in Kind)})")
            want = 3 if fields[0] == "map" else 4
        elif len(fields) == 2 and want == 4 and fields[1] not in SCOPES:
            raise XattrMapError(f"xattrmap rule {number}: invalid scope {fields[1]!r} "
                                f"(expected {', '.join(SCOPES)})")
    return fields, end


def _bytes(s: str) -> bytes:
    return os.fsencode(s)


def parse(value: str) -> tuple[Rule, ...]:
    """The rules of a map, `map` expanded; XattrMapError for a malformed one."""
    text = value.strip()
    pos = 0
    rules: list[Rule] = []
    number = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        number += 1
        fields, pos = _fields(text, pos, number)
        kind = Kind(fields[0])
        if kind is Kind.MAP:
            if text[pos:].strip():
                raise XattrMapError(f"xattrmap rule {number}: a map rule must be the last rule")
            key, prepend = _bytes(fields[1]), _bytes(fields[2])
            rules.append(Rule(Kind.PREFIX, True, True, key, prepend))
            if key:
                rules.append(Rule(Kind.BAD, True, True, prepend, key))
                rules.append(Rule(Kind.OK, True, True, b"", b""))
            else:
                rules.append(Rule(Kind.BAD, True, True, b"", b""))
        else:
            client, server = SCOPES[fields[1]]
            rules.append(Rule(kind, client, server, _bytes(fields[2]), _bytes(fields[3])))
        if any(b"\0" in r.key + r.prepend for r in rules[-3:]):
            raise XattrMapError(f"xattrmap rule {number} contains a NUL byte")
    if not rules:
        raise XattrMapError("xattrmap has no rules")
    return tuple(rules)


class XattrMap:
    def __init__(self, value: str) -> None:
        self.rules = parse(value)

    def to_host(self, name: bytes) -> bytes:
        """The host's name for a guest's; OSError(EPERM or ENOTSUP) when the map refuses it."""
        for r in self.rules:
            if r.client and name.startswith(r.key):
                if r.kind is Kind.PREFIX:
                    return r.prepend + name
                if r.kind is Kind.OK:
                    return name
                code = errno.EPERM if r.kind is Kind.BAD else errno.ENOTSUP
                raise OSError(code, os.strerror(code))
        raise OSError(errno.EPERM, "no xattrmap rule matches")

    def to_guest(self, name: bytes) -> bytes | None:
        """The guest's name for a host's, or None to hide it."""
        for r in self.rules:
            if r.server and name.startswith(r.prepend):
                if r.kind is Kind.PREFIX:
                    return name[len(r.prepend):]
                return name if r.kind is Kind.OK else None
        return None
