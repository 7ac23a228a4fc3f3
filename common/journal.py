"""The inflight journal: what a queue worker was doing, kept where its successor can read it.

A worker can be killed at any instruction.  Its ring, guest memory and the shared inode/handle
tables survive it; this journal records, per virtqueue, enough to finish every request the dead
worker had taken from the ring, exactly once.  It is modelled on vhost-user inflight tracking
(protocol.md 1.11): a MAP_SHARED anonymous mapping created by the supervisor before it forks, so
every worker, respawned ones included, inherits it.  Only the worker of a queue writes that
queue's part; the supervisor and the next worker read it once the writer is dead.

Per head (descriptor index) one 64-byte slot:

    0   u64  state word  state (8 bits) | avail position (16) << 8 | pop counter (40) << 24
    8   u32  used length (the reply's size once REPLIED)      12  u32  FUSE opcode
    16  u64  FUSE unique (for the log line about a dead worker)
    24  u32  pre-state kind     28  u32  pre-state flags      32  4 x u64  pre-state values

States: FREE -> POPPED (taken from the avail ring; nothing with a side effect started yet)
-> EXECUTING (a non-idempotent operation is about to run; the pre-state says what the
filesystem looked like just before) -> REPLIED (the reply is in guest memory and `used length`
is final; only the used-ring push is missing) -> FREE (pushed).  Every transition is one aligned
8-byte store of the state word, made after the slot's other fields: a reader sees the old or
the new state with consistent fields, never a torn mix.

Queue header (words): `next` = pop counter << 16 | next avail index; `pushing` = the head and
used index of a push in progress (so a successor can tell whether the used entry went out);
`geometry` = a key of the ring's size and addresses, to know whether a started ring is the ring
the journal describes.  Pops store the slot first and `next` second: a slot whose avail position
equals `next` was popped by a worker that died in between, and `next` is advanced past it.

Per queue, also:
* effects -- what the request being executed changed in the shared tables: lookups counted and
  handles opened (undone before the request is replayed), FORGETs applied (skipped when it is
  replayed) and the FORGET being applied with the lookup count it found (so a replay can tell
  whether it went through).  Tagged with the request's pop counter.
* pins -- inode/handle pins the worker holds (released for it when it dies).
* fds -- fds the worker owns in the shared fd table (kick/call eventfds, /proc/self/fd), which
  its successor closes.
Each is recorded *after* the change it describes and forgotten *before* it is undone, so a kill
between the two can only leak (an fd, a pin, a lookup count), never release twice.

The global header holds shared counters for the test hooks (worker/testhooks.py).

The request path's writes (popped, executing, replied, pushed, pins, effects, FORGET
bookkeeping) are implemented once in C (common/state.c, the vfs_jq_* functions), shared with the
native request engine; this module calls them and keeps the cold paths (reset, reading a dead
worker's journal back) in Python.
"""

from __future__ import annotations

import enum
import mmap
import struct

# hashlib.blake2b is this built-in one, but importing hashlib loads OpenSSL's libcrypto (about
# 1.7 MB of PSS in every process of the daemon) for this one digest.
from _blake2 import blake2b
from dataclasses import dataclass

from pyvirtiofsd.common import native, shm

__all__ = ["Effect", "Inflight", "Journal", "PreState", "QueueJournal", "SlotState",
           "geometry_key"]

_MAGIC = b"PVFSJRN1"
_PAGE = mmap.PAGESIZE
_GLOBAL_SIZE = _PAGE
_HOOKS_OFF = 64
MAX_HOOKS = 32

# Queue header, in u64 words.
_W_NEXT = 0
_W_PUSHING = 1
_W_GEOMETRY = 2
_W_SIZE_BOOTS = 3       # u32 size, u32 boots
_W_EFF_OWNER = 4
_W_EFF_COUNT = 5        # u32 count, u32 overflow
_W_EFF_FORGETS = 6
_W_PENDING_NODE = 7     # nodeid of the FORGET being applied (0: none)
_W_FDS = 8              # 16 x i32 (fd + 1; 0 empty) = 8 words
MAX_FDS = 16
_W_PINS = 16            # 8 x u64 ids
MAX_PINS = 8
_PIN_KINDS_OFF = 24 * 8  # 8 x u8
_W_PENDING_BEFORE = 25  # its nlookup before (u64)
_W_PENDING_INDEX = 26   # which FORGET of the request it is
_HEADER_SIZE = 256
_SLOT_SIZE = 64
_SLOT_WORDS = _SLOT_SIZE // 8
MAX_EFFECTS = 8192

_SLOT_META = struct.Struct("=IIQ")          # used_len, opcode, unique (offset 8)
_SLOT_PRE = struct.Struct("=IIQQQQ")        # kind, flags, v0..v3 (offset 24)
_PUSHING = 1 << 63
_COUNTER_MASK = (1 << 40) - 1


class SlotState(enum.IntEnum):
    FREE = 0
    POPPED = 1
    EXECUTING = 2
    REPLIED = 3


class Effect(enum.IntEnum):
    """A change to the shared tables made by the request being executed."""

    LOOKUP = 1      # one lookup counted on a nodeid (undo: forget 1)
    HANDLE = 2      # a handle inserted (undo: remove it)


class PinKind(enum.IntEnum):
    INODE = 1
    HANDLE = 2


@dataclass(frozen=True, slots=True)
class PreState:
    """What a non-idempotent operation saw just before it ran (meaning: worker/recovery.py)."""

    kind: int = 0
    flags: int = 0
    values: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Inflight:
    head: int
    state: SlotState
    avail_pos: int
    counter: int
    used_len: int
    opcode: int
    unique: int
    pre: PreState


def geometry_key(size: int, desc: int, avail: int, used: int) -> int:
    """A non-zero 64-bit key naming one ring layout, the same in every process."""
    digest = blake2b(struct.pack("=IQQQ", size, desc, avail, used), digest_size=8)
    return int.from_bytes(digest.digest(), "little") | 1


_popped = native.lib.vfs_jq_popped
_replied = native.lib.vfs_jq_replied
_pushed = native.lib.vfs_jq_pushed
_add_effect = native.lib.vfs_jq_add_effect
_pin = native.lib.vfs_jq_pin
_unpin = native.lib.vfs_jq_unpin


class QueueJournal:
    """One queue's part of the journal.  Written only by that queue's (single-threaded) worker."""

    def __init__(self, view: memoryview, base, offset: int, capacity: int) -> None:
        self._view = view
        self._off = offset
        self._w = native.u64_ptr(base, offset)
        self._u32 = native.u32_ptr(base, offset)
        self._fds = native.ffi.cast("int32_t *", base + offset + _W_FDS * 8)
        self._kinds = native.ffi.cast("uint8_t *", base + offset + _PIN_KINDS_OFF)
        self.capacity = capacity
        self._slots = _HEADER_SIZE // 8
        eff = _HEADER_SIZE + capacity * _SLOT_SIZE
        self._eff_ids = _HEADER_SIZE // 8 + capacity * _SLOT_WORDS
        self._eff_kinds = native.ffi.cast("uint8_t *", base + offset + eff + MAX_EFFECTS * 8)
        # The C view (struct vfs_jq *), which also holds the request being executed (its head
        # and popped word): the native engine shares this very struct (address).
        self._q = native.ffi.new("struct vfs_jq *")
        if native.lib.vfs_jq_attach(self._q, base + offset, capacity):
            raise ValueError(f"journal region at {offset} for {capacity} entries")

    @staticmethod
    def region_size(capacity: int) -> int:
        return native.lib.vfs_jq_region_size(capacity, _PAGE)

    @property
    def cdata(self):
        """The `struct vfs_jq *` itself, for the journaled table calls (common/arena.py)."""
        return self._q

    # -- ring epochs ---------------------------------------------------------------------------
    @property
    def geometry(self) -> int:
        return self._w[_W_GEOMETRY]

    @property
    def boots(self) -> int:
        return self._u32[_W_SIZE_BOOTS * 2 + 1]

    def count_boot(self) -> int:
        """Count one worker start for this queue; returns the count including this one."""
        n = (self._u32[_W_SIZE_BOOTS * 2 + 1] + 1) & 0xFFFFFFFF
        self._u32[_W_SIZE_BOOTS * 2 + 1] = n
        return n

    def reset(self, next_avail: int, geometry: int, size: int) -> None:
        """A new ring epoch: no request in flight, popping resumes at `next_avail`."""
        if not 0 < size <= self.capacity:
            raise ValueError(f"queue size {size} outside the journal's 1..{self.capacity}")
        start = self._off + _HEADER_SIZE
        self._view[start:start + self.capacity * _SLOT_SIZE] = bytes(self.capacity * _SLOT_SIZE)
        counter = self._w[_W_NEXT] >> 16
        self._w[_W_PUSHING] = 0
        self._w[_W_EFF_OWNER] = 0
        self._u32[_W_SIZE_BOOTS * 2] = size
        self._w[_W_GEOMETRY] = geometry
        self._w[_W_NEXT] = counter << 16 | (next_avail & 0xFFFF)

    @property
    def size(self) -> int:
        return self._u32[_W_SIZE_BOOTS * 2]

    # -- the request path (worker) ---------------------------------------------------------------
    def popped(self, head: int, pos: int, opcode: int, unique: int,
               effects: bool = True) -> int:
        """`head` was taken from avail position `pos`; returns its pop counter.  With
        `effects`, table changes from here on are the new request's (begin_effects)."""
        if not 0 <= head < self.capacity:
            raise IndexError(f"head {head} outside the journal's 0..{self.capacity - 1}")
        return _popped(self._q, head, pos & 0xFFFF, opcode & 0xFFFFFFFF,
                       unique & 0xFFFFFFFFFFFFFFFF, effects)

    def resume(self, rec: Inflight) -> None:
        """Make `rec` (a journaled request being replayed) the request being executed."""
        native.lib.vfs_jq_resume(self._q, rec.head)

    @property
    def address(self) -> int:
        """The address of this queue's `struct vfs_jq`: the native engine journals through the
        very view Python uses, so both see the same request being executed."""
        return int(native.ffi.cast("uintptr_t", self._q))

    def executing(self, pre: PreState) -> None:
        """The current request is about to make a change that must not be repeated."""
        v = pre.values
        native.lib.vfs_jq_executing(self._q, pre.kind, pre.flags, v[0], v[1], v[2], v[3])

    def replied(self, head: int, used_len: int, used_idx: int) -> None:
        """The reply is in guest memory; only the used-ring push is left, and it will go to
        used index `used_idx` (so a successor can tell whether it did)."""
        _replied(self._q, head, used_len & 0xFFFFFFFF, used_idx & 0xFFFF)

    def pushed(self, head: int) -> None:
        _pushed(self._q, head)

    def set_inflight(self, address: int, desc_num: int) -> None:
        """Keep the vhost-user inflight region at `address` (0: none) current from here on
        (common/inflight.py): the request path writes it next to this journal."""
        region = native.ffi.cast("void *", address) if address else native.ffi.NULL
        if native.lib.vfs_jq_set_inflight(self._q, region, desc_num if address else 0):
            raise ValueError(f"inflight region at {address:#x} for {desc_num} descriptors")

    # -- effects of the request being executed ----------------------------------------------------
    def begin_effects(self, counter: int, forgets: int = 0) -> None:
        """Effects from here on belong to the request popped as `counter`.  A replay passes the
        FORGETs its first run completed, so that a second crash keeps them.  The owner is
        stored last: until then the record still describes the previous owner, or (replay)
        the same request."""
        native.lib.vfs_jq_begin_effects(self._q, counter, forgets)

    def add_effect(self, kind: Effect, ident: int) -> None:
        _add_effect(self._q, kind, ident)

    def forgetting(self, nodeid: int, nlookup_before: int) -> None:
        """A FORGET of `nodeid` is about to be applied; its lookup count is `nlookup_before`."""
        native.lib.vfs_jq_forgetting(self._q, nodeid, nlookup_before)

    def note_forget(self) -> None:
        """One more FORGET applied (counted first: the pending record then names an index
        already counted, which a replay ignores)."""
        native.lib.vfs_jq_note_forget(self._q)

    def owns_effects(self, counter: int) -> bool:
        return self._w[_W_EFF_OWNER] == counter + 1

    def hints(self) -> tuple[int, tuple[int, int] | None, bool]:
        """Of the effects' owner: FORGETs applied, the FORGET that may or may not have been
        applied next as (nodeid, lookup count before), and whether effects overflowed."""
        forgets = self._w[_W_EFF_FORGETS]
        node = self._w[_W_PENDING_NODE]
        pending = None
        if node and self._w[_W_PENDING_INDEX] == forgets:
            pending = (node, self._w[_W_PENDING_BEFORE])
        return forgets, pending, bool(self._u32[_W_EFF_COUNT * 2 + 1])

    def pop_effect(self) -> tuple[int, int] | None:
        """Take the last recorded effect off the record, to undo it (record first, then undo:
        a kill in between leaks the effect instead of undoing it twice)."""
        n = min(self._u32[_W_EFF_COUNT * 2], MAX_EFFECTS)
        if not n:
            return None
        kind, ident = self._eff_kinds[n - 1], self._w[self._eff_ids + n - 1]
        self._u32[_W_EFF_COUNT * 2] = n - 1
        return kind, ident

    def drop_effects(self) -> None:
        self._w[_W_EFF_OWNER] = 0

    # -- pins -------------------------------------------------------------------------------------
    def pin(self, kind: PinKind, ident: int) -> int:
        """Record a pin just taken; returns its record index (-1: no room, the pin may leak)."""
        return _pin(self._q, kind, ident)

    def unpin(self, kind: PinKind, ident: int) -> None:
        """Forget a pin record before the pin is released."""
        _unpin(self._q, kind, ident)

    def pins(self) -> list[tuple[int, int]]:
        return [(self._kinds[i], self._w[_W_PINS + i]) for i in range(MAX_PINS)
                if self._w[_W_PINS + i]]

    # -- fds owned by the worker ------------------------------------------------------------------
    def own_fd(self, fd: int) -> None:
        """Record an fd the worker owns (once: a second record would outlive the close and
        make a successor close a number that is no longer this worker's)."""
        free = -1
        for i in range(MAX_FDS):
            if self._fds[i] == fd + 1:
                return
            if free < 0 and not self._fds[i]:
                free = i
        if free >= 0:
            self._fds[free] = fd + 1

    def disown_fd(self, fd: int) -> None:
        for i in range(MAX_FDS):
            if self._fds[i] == fd + 1:
                self._fds[i] = 0
                return

    def forget_fds(self) -> None:
        """Drop every fd record: they name fds of another fd table (a daemon that took over
        the journal), which no successor may close."""
        for i in range(MAX_FDS):
            self._fds[i] = 0

    def owned_fds(self) -> list[int]:
        return [self._fds[i] - 1 for i in range(MAX_FDS) if self._fds[i] > 0]

    # -- reading it back (successor worker, supervisor) --------------------------------------------
    def next_avail(self) -> tuple[int, int]:
        """(next avail index, next pop counter), counting a pop whose index store was lost."""
        nxt = self._w[_W_NEXT]
        pos, counter = nxt & 0xFFFF, nxt >> 16
        size = min(self.size, self.capacity)
        for head in range(size):
            word = self._w[self._slots + head * _SLOT_WORDS]
            if word & 0xFF and (word >> 8) & 0xFFFF == pos \
                    and (word >> 24) & _COUNTER_MASK == counter & _COUNTER_MASK:
                return (pos + 1) & 0xFFFF, counter + 1
        return pos, counter

    def repair_next(self) -> int:
        """Store what next_avail() computed; returns the next avail index."""
        pos, counter = self.next_avail()
        self._w[_W_NEXT] = counter << 16 | pos
        return pos

    def pushing(self) -> tuple[int, int] | None:
        """(head, used index before the push) of a push that may not have completed."""
        word = self._w[_W_PUSHING]
        if not word & _PUSHING:
            return None
        return word & 0xFFFF, (word >> 16) & 0xFFFF

    def settle_push(self, used_idx: int) -> None:
        """Finish the bookkeeping of an interrupted push, given the ring's used index now."""
        p = self.pushing()
        if p is None:
            return
        head, before = p
        if used_idx != before and head < self.capacity:
            s = self._slots + head * _SLOT_WORDS
            if self._w[s] & 0xFF == SlotState.REPLIED:
                self._w[s] = SlotState.FREE         # the used entry went out
        self._w[_W_PUSHING] = 0

    def inflight(self) -> list[Inflight]:
        """Every request not yet pushed, in the order it was popped."""
        out = []
        size = min(self.size, self.capacity)
        for head in range(size):
            s = self._slots + head * _SLOT_WORDS
            word = self._w[s]
            state = word & 0xFF
            if not state:
                continue
            try:
                st = SlotState(state)
            except ValueError:
                continue
            used_len, opcode, unique = _SLOT_META.unpack_from(self._view, self._off + s * 8 + 8)
            kind, flags, *vals = _SLOT_PRE.unpack_from(self._view, self._off + s * 8 + 24)
            out.append(Inflight(head, st, (word >> 8) & 0xFFFF, (word >> 24) & _COUNTER_MASK,
                                used_len, opcode, unique, PreState(kind, flags, tuple(vals))))
        out.sort(key=lambda r: r.counter)
        return out


class Journal:
    """The whole journal: a global header and one QueueJournal per virtqueue."""

    def __init__(self, mm: mmap.mmap, num_queues: int, capacity: int, fd: int = -1) -> None:
        self._mm = mm
        self.fd = fd
        self._view = memoryview(mm)
        self._base = native.address_of(mm)
        self.num_queues = num_queues
        self.capacity = capacity
        step = QueueJournal.region_size(capacity)
        self._queues = [QueueJournal(self._view, self._base, _GLOBAL_SIZE + q * step, capacity)
                        for q in range(num_queues)]
        self._hooks = native.u64_ptr(self._base, _HOOKS_OFF)

    @classmethod
    def create(cls, num_queues: int, capacity: int, keep_fd: bool = False) -> Journal:
        """Map a zeroed journal for `num_queues` rings of at most `capacity` entries.
        keep_fd: keep its memfd (the supervisor, for a live upgrade)."""
        if not 0 < num_queues <= 0x8000 or not 0 < capacity <= 32768:
            raise ValueError(f"journal for {num_queues} queues of {capacity} entries")
        size = _GLOBAL_SIZE + num_queues * QueueJournal.region_size(capacity)
        fd, mm = shm.create(size, "journal", keep_fd)
        mm[0:8] = _MAGIC
        return cls(mm, num_queues, capacity, fd)

    def queue(self, index: int) -> QueueJournal:
        return self._queues[index]

    def hook_hit(self, index: int) -> int:
        """Count one match of test hook `index` in any process; returns the new count."""
        return native.lib.vfs_fetch_add64(self._hooks + index, 1) + 1
