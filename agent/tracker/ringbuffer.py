"""The tracefs ring buffer's binary pages, parsed: page header, event headers, block events. No I/O: the
tracker (agent.tracker.tracefs) reads the pages from ``trace_pipe_raw`` and hands them here.

Ring-buffer page layout (kernel 6.x, little-endian; offsets are read from ``events/header_page``)::

    0       8               16                                     16 + len
    +-------+---------------+--------------------------------------+------------------+
    | ts u64| commit (long) | events ...                           | zero / missed cnt|
    +-------+---------------+--------------------------------------+------------------+
    commit: bits 0..26 = len (bytes of events), bit 30 = missed count stored after the events,
            bit 31 = events were missed before this page

    event header (u32): type_len:5 | time_delta:27, then array[0] (u32) for some types
      type_len 1..28  data of type_len * 4 bytes follows the header
      type_len 0      array[0] = data length + 4 (itself); the data follows array[0]
      29 padding      time_delta 0: nothing more on this page; else a discarded event of array[0] bytes
      30 time extend  delta = array[0] << 27 | time_delta, no data
      31 time stamp   absolute time = array[0] << 27 | time_delta, no data

The parser follows libtraceevent's ``kbuffer-parse.c`` (``translate_data``/``update_pointers``); the
kernel counts only data events (type_len 0..28) in ``read events``, so that is what is counted here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .base import TrackingLost

SECTOR = 512
# Queue events mark when a write was *submitted*: the caller's consistency proof needs them (a write
# submitted after a cut may have reached what we read); the dirty map is driven by completions.
QUEUE_EVENTS = ("block_bio_queue",)

# Page-header commit flags (kernel/trace/ring_buffer.c RB_MISSED_EVENTS / RB_MISSED_STORED).
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
COMMIT_LEN_MASK = (1 << 27) - 1  # libtraceevent's COMMIT_MASK

_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_FIELD = re.compile(r"field:([^;]*);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);")


@dataclass(frozen=True)
class HeaderLayout:
    """Where the page header's fields are, and the event-header type codes (from header_page/header_event)."""

    ts_offset: int = 0
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16
    padding: int = 29
    time_extend: int = 30
    time_stamp: int = 31
    data_max: int = 28
    delta_bits: int = 27

    @classmethod
    def from_text(cls, header_page: str, header_event: str) -> HeaderLayout:
        f = parse_fields(header_page)
        types = dict(re.findall(r"(\w+)\s*:\s*type == (\d+)", header_event))
        bits = dict(re.findall(r"(\w+)\s*:\s*(\d+) bits", header_event))
        data_max = re.search(r"data max type_len\s*==\s*(\d+)", header_event)
        try:
            layout = cls(
                f["timestamp"][0],
                f["commit"][0],
                f["commit"][1],
                f["data"][0],
                int(types["padding"]),
                int(types["time_extend"]),
                int(types["time_stamp"]),
                int(data_max.group(1)) if data_max else -1,
                int(bits["time_delta"]),
            )
        except KeyError as exc:
            raise TrackingLost(f"unsupported ring-buffer header format (no {exc} field)") from None
        if f["timestamp"][1] != 8 or layout.commit_size not in (4, 8) or int(bits.get("type_len", 0)) != 5:
            raise TrackingLost("unsupported ring-buffer header format (field sizes)")
        return layout


def parse_fields(format_text: str) -> dict[str, tuple[int, int]]:
    """Field name -> (offset, size) from a tracefs ``format`` or ``header_page`` file."""
    out = {}
    for decl, offset, size, _ in _FIELD.findall(format_text):
        name = decl.split()[-1].split("[")[0]
        out[name] = (int(offset), int(size))
    return out


@dataclass(frozen=True)
class EventLayout:
    """How to unpack (dev, sector, nr_sector, rwbs) from one block completion event's data."""

    name: str
    id: int
    fields: struct.Struct

    @classmethod
    def from_format(cls, format_text: str) -> EventLayout:
        name = re.search(r"^name: (\S+)", format_text, re.M)
        ident = re.search(r"^ID: (\d+)", format_text, re.M)
        f = parse_fields(format_text)
        codes = {"dev": {4: "I"}, "sector": {8: "Q"}, "nr_sector": {4: "I"}}
        spec, pos = "<", 0
        try:
            for field in sorted(("dev", "sector", "nr_sector", "rwbs"), key=lambda n: f[n][0]):
                off, size = f[field]
                code = f"{size}s" if field == "rwbs" else codes[field][size]
                spec += f"{off - pos}x{code}" if off > pos else code
                pos = off + size
        except KeyError as exc:
            raise TrackingLost(f"unsupported block event format (field {exc} missing or of unknown size)") from None
        if not (name and ident):
            raise TrackingLost("unsupported block event format (no name or ID)")
        order = sorted(("dev", "sector", "nr_sector", "rwbs"), key=lambda n: f[n][0])
        if order != ["dev", "sector", "nr_sector", "rwbs"]:
            raise TrackingLost(f"unsupported block event format (field order {order})")
        return cls(name.group(1), int(ident.group(1)), struct.Struct(spec))


class PageParser:
    """Turns ring-buffer pages into (timestamp_ns, start, end) byte ranges of one device. No I/O.

    `dev` is the kernel dev_t of the whole disk; `start`/`size` the tracked range on it in bytes (a
    partition's; the whole disk's is 0/size). Ranges are returned relative to `start`, clipped to `size`.
    """

    def __init__(
        self,
        header: HeaderLayout,
        events: list[EventLayout],
        marker_id: int,
        marker: bytes,
        dev: int,
        start: int,
        size: int,
    ) -> None:
        self.header = header
        self.events = {e.id: e.fields for e in events}
        self.queue_ids = {e.id for e in events if e.name in QUEUE_EVENTS}
        self.queued: list[tuple[int, int, int]] = []  # (submit time, start, end) since the last take
        self.marker_id = marker_id
        self.marker = marker
        self.dev = dev
        self.start = start
        self.size = size
        self._page_head = struct.Struct("<Q" + ("Q" if header.commit_size == 8 else "I"))
        if header.ts_offset != 0 or header.commit_offset != 8:
            raise TrackingLost("unsupported ring-buffer page header (timestamp/commit offsets)")
        self.marker_seen = False
        self.last_ts: dict[int, int] = {}  # cpu -> time of the last event parsed on it
        self.discarded = 0  # discarded events the kernel left in the page as padding
        self.unmatched = 0  # block events of other disks, reads, flushes: not ours

    def _page_start(self, page: bytes | bytearray | memoryview, cpu: int) -> tuple[int, int]:
        """The page header: (time of the page, end of its events). Raises TrackingLost when the kernel
        flags missed events or the commit runs past the page."""
        h = self.header
        ts, commit = self._page_head.unpack_from(page, 0)
        length = commit & COMMIT_LEN_MASK
        if commit & (MISSED_EVENTS | MISSED_STORED):
            n = ""
            if commit & MISSED_STORED and h.data_offset + length + 8 <= len(page):
                n = f" ({struct.unpack_from('<Q', page, h.data_offset + length)[0]} events)"
            raise TrackingLost(f"cpu{cpu}: the kernel ring buffer missed events{n} before a page (missed-events flag)")
        # A page that continues a partly read kernel page is stamped with the kernel's read_stamp, which
        # leaves out the deltas of discarded events (rb_update_read_stamp skips padding) and so can lie
        # before events already parsed; time on one CPU never goes back, so resume from the last event.
        ts = max(ts, self.last_ts.get(cpu, 0))
        end = h.data_offset + length
        if end > len(page):
            raise TrackingLost(f"cpu{cpu}: malformed ring-buffer page (commit {length} beyond the page)")
        return ts, end

    def parse(self, page: bytes | bytearray | memoryview, out: list[tuple[int, int, int]], cpu: int = 0) -> int:
        """Append this page's matching write ranges to `out`; returns how many data events it held.

        Raises TrackingLost when the kernel flags missed events or the page is malformed.

        One loop over the page's events, with the per-event work inline: this runs for every block write
        of the machine (and every other block event), so a call per event would cost more than the rest.
        """
        h = self.header
        ts, end = self._page_start(page, cpu)
        u32, u16 = _U32.unpack_from, _U16.unpack_from
        events, marker_id = self.events, self.marker_id
        dev, base, size = self.dev, self.start, self.size
        padding, extend, stamp, data_max, shift = h.padding, h.time_extend, h.time_stamp, h.data_max, h.delta_bits
        delta_mask = (1 << shift) - 1
        count = 0
        pos = h.data_offset
        try:
            while pos < end:
                word = u32(page, pos)[0]
                tl = word & 31
                delta = word >> 5 & delta_mask
                if 0 < tl <= data_max:
                    data = pos + 4
                    pos = data + tl * 4
                elif tl == 0:
                    data = pos + 8
                    n = u32(page, pos + 4)[0] - 4  # array[0] counts itself
                    if n < 0:
                        raise TrackingLost(f"cpu{cpu}: malformed ring-buffer page (event length {n + 4})")
                    pos = data + ((n + 3) & ~3)
                elif tl == extend:
                    ts += delta + (u32(page, pos + 4)[0] << shift)
                    pos += 8
                    continue
                elif tl == stamp:  # its top 5 bits are dropped (TS_MSB): only past 2**59 ns (18 years) of uptime
                    ts = delta | u32(page, pos + 4)[0] << shift
                    pos += 8
                    continue
                elif tl == padding:
                    if delta == 0:  # the rest of the page is empty
                        break
                    # A discarded event: the writer stamped the next event relative to it (the kernel's own
                    # check_buffer() adds it too), so its delta counts. A zero delta was made 1 ns to tell it
                    # from the null padding: at most 1 ns late per discarded event.
                    ts += delta
                    self.discarded += 1
                    pos += 4 + u32(page, pos + 4)[0]
                    continue
                else:
                    raise TrackingLost(f"cpu{cpu}: malformed ring-buffer page (event type {tl})")
                if pos > end:
                    raise TrackingLost(f"cpu{cpu}: malformed ring-buffer page (event runs past the commit)")
                ts += delta
                count += 1
                ctype = u16(page, data)[0]
                layout = events.get(ctype)
                if layout is None:
                    if ctype == marker_id and self.marker in bytes(page[data:pos]):
                        self.marker_seen = True
                    continue
                edev, sector, nr, rwbs = layout.unpack_from(page, data)
                if edev != dev or nr == 0 or b"R" in rwbs.partition(b"\0")[0]:
                    self.unmatched += 1
                    continue
                a = sector * SECTOR - base
                b = a + nr * SECTOR
                if a < 0:
                    a = 0
                if b > size:
                    b = size
                if a < b:
                    if ctype in self.queue_ids:
                        self.queued.append((ts, a, b))
                    else:
                        out.append((ts, a, b))
        except struct.error:  # a length field pointing past the end of the page
            raise TrackingLost(f"cpu{cpu}: malformed ring-buffer page (event runs past the page)") from None
        self.last_ts[cpu] = ts
        return count
