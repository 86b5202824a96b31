"""The Linux change tracker: block-layer completion events read from a private tracefs instance.

Theory of operation
-------------------
``start()`` creates ``<tracefs>/instances/<instance>`` (replacing a stale one left by a killed agent),
sizes its per-CPU ring buffers, selects the ``mono`` clock, turns *overwrite* off (a full buffer drops new
events and counts them, it never silently replaces unread ones) and enables both completion events:
``block_rq_complete`` (blk-mq devices: loop, nvme, sd) and ``block_bio_complete`` (bio-based devices: md,
dm, zram). Completions drive the dirty map (not queue events: a write already in flight when tracking
starts is still seen). ``block_bio_queue`` is recorded too and kept apart (``take_queued``): the
submission time of a write is what proves that a read did not see it. No kernel event filter (it lost
events, see ``_setup``): this disk's writes are picked here. Last it writes a unique *start marker* into
the instance's ``trace_marker``.

``poll()`` reads every CPU's ``trace_pipe_raw`` (binary ring-buffer pages, non-blocking) until it is empty,
parses the pages here (``PageParser``) and returns the written byte ranges. It then checks that it can
*prove* nothing was missed (promise 3) and raises ``TrackingLost`` otherwise:

* a page header carries the kernel's missed-events flag;
* a CPU's ``stats`` shows overrun, commit overrun or dropped events;
* the kernel's ``read events`` count of a CPU differs from the number of events parsed here on that CPU
  (another reader consumed events, or the buffer was reset);
* the first poll did not find the start marker (the buffer was reset between start and poll);
* a setting of the instance changed (tracing turned off, an event disabled, filter, clock, buffer size,
  CPU mask...) or the instance disappeared.

Once lost, the tracker stays lost until ``close()`` and a new ``start()``.

Limits (root can defeat them, the instance is private to us): switching ``tracing_on`` off and on again
between two polls leaves no trace, nor does resetting one CPU's buffer while we had parsed nothing on that
CPU. The kernel refuses to remove the instance while we hold its files open.

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

import errno
import os
import re
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .base import TrackingLost

SECTOR = 512
EVENTS = ("block_rq_complete", "block_bio_complete", "block_bio_queue")
# Queue events mark when a write was *submitted*: the caller's consistency proof needs them (a write
# submitted after a cut may have reached what we read); the dirty map is driven by completions.
QUEUE_EVENTS = ("block_bio_queue",)

# Page-header commit flags (kernel/trace/ring_buffer.c RB_MISSED_EVENTS / RB_MISSED_STORED).
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
COMMIT_LEN_MASK = (1 << 27) - 1  # libtraceevent's COMMIT_MASK
KERNEL_MINOR_BITS = 20  # dev_t inside the kernel (and so in trace events) is major << 20 | minor

# An event may become readable a little after its timestamp (it is stamped when reserved, readable when
# committed, microseconds later). A caller wanting every event stamped up to T polls after T + SETTLE_NS.
SETTLE_NS = 1_000_000

_STATS_MUST_BE_ZERO = ("overrun", "commit overrun", "dropped events")
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

    def parse(self, page: bytes | bytearray | memoryview, out: list[tuple[int, int, int]], cpu: int = 0) -> int:
        """Append this page's matching write ranges to `out`; returns how many data events it held.

        Raises TrackingLost when the kernel flags missed events or the page is malformed.
        """
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


# -- the device -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the kernel events of a device look like: the whole disk's dev_t and the device's byte range."""

    dev: int  # kernel dev_t of the whole disk
    start: int  # bytes from the start of the whole disk (a partition's start, else 0)
    size: int  # bytes

    @classmethod
    def resolve(cls, device: str) -> Target:
        st = os.stat(device)
        if not stat.S_ISBLK(st.st_mode):
            raise TrackingLost(f"{device} is not a block device")
        sysdir = Path(os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"))
        size = int((sysdir / "size").read_text()) * SECTOR
        if (sysdir / "partition").exists():
            start = int((sysdir / "start").read_text()) * SECTOR
            major, minor = ((sysdir.parent / "dev").read_text()).split(":")
        else:
            start, (major, minor) = 0, (os.major(st.st_rdev), os.minor(st.st_rdev))
        return cls(int(major) << KERNEL_MINOR_BITS | int(minor), start, size)


# -- tracefs --------------------------------------------------------------------------------------------


def ensure_mounted(tracefs: str = "/sys/kernel/tracing") -> None:
    """Mount tracefs at `tracefs` unless /proc/mounts shows it there already."""
    want = os.path.realpath(tracefs)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            # /proc/mounts escapes blanks in paths as octal (\040).
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
            if parts[2] == "tracefs" and where == want:
                return
    res = subprocess.run(["mount", "-t", "tracefs", "nodev", tracefs], capture_output=True, text=True)
    if res.returncode:
        raise OSError(f"mount -t tracefs nodev {tracefs} failed: {res.stderr.strip() or res.returncode}")


def available(tracefs: str = "/sys/kernel/tracing") -> str | None:
    """None when this tracker can run here, else a one-line reason."""
    if os.geteuid() != 0:
        return f"tracefs tracking needs root (running as uid {os.geteuid()})"
    if sys.byteorder != "little":
        return "the ring-buffer parser supports little-endian machines only"
    try:
        lockdown = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        lockdown = ""
    if "[confidentiality]" in lockdown:
        return "kernel lockdown (confidentiality) forbids tracefs"
    try:
        ensure_mounted(tracefs)
    except OSError as exc:
        return f"tracefs is not usable: {exc}"
    root = Path(tracefs)
    if not (root / "instances").is_dir():
        return f"{tracefs} has no instances directory"
    for event in [f"block/{e}" for e in EVENTS] + ["ftrace/print"]:
        if not (root / "events" / event / "format").exists():
            return f"trace event {event} is missing from this kernel"
    try:
        HeaderLayout.from_text((root / "events/header_page").read_text(), (root / "events/header_event").read_text())
    except (OSError, TrackingLost) as exc:
        return f"cannot read the ring-buffer format: {exc}"
    return None


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _remove_instance(path: Path, stop_first: bool) -> None:
    """Remove a trace instance (the kernel disables its events on rmdir); a missing one is fine.

    An instance someone still has files open in is refused by the kernel (EBUSY): it may be another agent's,
    so a stale instance is not stopped first (`stop_first` False), only our own is.
    """
    try:
        if stop_first:
            _write(path / "tracing_on", "0")
            _write(path / "events/enable", "0")
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TrackingLost(f"trace instance {path} is in use by another process (another agent?)") from None
        raise


def remove_stale(instance: str, tracefs: str = "/sys/kernel/tracing") -> bool:
    """Remove the trace instance of an agent that is not running any more (killed -9, or a test's); an
    instance still in use is left alone. True if one was removed."""
    path = Path(tracefs) / "instances" / instance
    if not path.is_dir():
        return False
    try:
        _remove_instance(path, stop_first=False)
    except (TrackingLost, OSError):
        return False
    return True


def _fresh_stats() -> dict[str, int | float]:
    keys = ("events", "records", "discarded", "unmatched", "pages", "bytes_read", "polls", "max_events_per_poll")
    return {**dict.fromkeys(keys, 0), "cpu_seconds": 0.0, "max_page_fill": 0.0}


class TracefsTracker:
    """Tracks writes to one block device (whole disk or partition) through a private tracefs instance."""

    proves_order = True  # its timestamps let the caller prove crash consistency

    def __init__(
        self, device: str, instance: str, buffer_kb_per_cpu: int = 16384, tracefs: str = "/sys/kernel/tracing"
    ) -> None:
        if not instance or "/" in instance or instance in (".", ".."):
            raise ValueError(f"bad trace instance name {instance!r}")
        self.device = device
        self.instance = instance
        self.buffer_kb = buffer_kb_per_cpu
        self.tracefs = Path(tracefs)
        self.path = self.tracefs / "instances" / instance
        # For reports: events (ranges returned), records (events parsed, as the kernel counts them),
        # discarded (filtered-out events left as padding), unmatched (refused here after the kernel filter),
        # pages, bytes_read, polls, cpu_seconds (spent in poll), max_events_per_poll and max_page_fill: the
        # largest share of one CPU's buffer a single poll found used; near 1.0 the kernel is about to drop.
        self.stats: dict[str, int | float] = _fresh_stats()
        self._created = False
        self._cpus: list[tuple[int, int, int]] = []  # (cpu number, trace_pipe_raw fd, stats fd)
        self._settings: list[tuple[str, int, bytes]] = []  # (name, fd, value read at start)
        self._parsed: dict[int, int] = {}  # cpu -> data events parsed (compared with the kernel's "read events")
        self._parser: PageParser | None = None
        self._lost: str | None = None
        self._marker_checked = False
        self._page = bytearray(0)
        self._max_pages = 0
        self._buffer_bytes = buffer_kb_per_cpu * 1024

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the instance and begin recording. Raises TrackingLost or OSError when impossible."""
        self.close()
        self._lost = None
        self._marker_checked = False
        self.stats = _fresh_stats()
        ensure_mounted(str(self.tracefs))
        target = Target.resolve(self.device)
        _remove_instance(self.path, stop_first=False)  # a stale one from an agent killed with -9
        self.path.mkdir()
        self._created = True
        try:
            self._setup(target)
        except BaseException:
            self.close()
            raise

    def _setup(self, target: Target) -> None:
        p = self.path
        _write(p / "tracing_on", "0")
        _write(p / "buffer_size_kb", str(self.buffer_kb))
        _write(p / "options/overwrite", "0")
        _write(p / "trace_clock", "mono")
        header = HeaderLayout.from_text(
            (self.tracefs / "events/header_page").read_text(), (self.tracefs / "events/header_event").read_text()
        )
        layouts = [EventLayout.from_format((p / "events/block" / e / "format").read_text()) for e in EVENTS]
        marker_id = int((p / "events/ftrace/print/id").read_text())
        # No kernel event filter: PageParser picks this disk's writes. Measured on kernel 6.18: with a filter
        # on the events, block_bio_queue events of writes went missing (about 1 in 5 with reads of the same
        # disk going on; 2 in 3000 without) and nothing counted the loss; without a filter none did.
        for e in EVENTS:
            _write(p / "events/block" / e / "filter", "0")
            _write(p / "events/block" / e / "enable", "1")
        subbuf = int((p / "buffer_subbuf_size_kb").read_text()) * 1024
        self._page = bytearray(subbuf)
        self._buffer_bytes = int((p / "buffer_size_kb").read_text().split()[0]) * 1024  # rounded up by the kernel
        # A poll reads at most a buffer's worth of pages per CPU, so a writer faster than us cannot keep poll
        # busy forever; what is left waits for the next poll (or is dropped, counted, and detected).
        self._max_pages = self._buffer_bytes // subbuf + 4
        for d in sorted((p / "per_cpu").iterdir(), key=lambda d: int(d.name[3:])):
            cpu = int(d.name[3:])
            raw = os.open(d / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
            self._cpus.append((cpu, raw, os.open(d / "stats", os.O_RDONLY)))
            self._parsed[cpu] = 0
        watched = ["tracing_on", "trace_clock", "buffer_size_kb", "buffer_subbuf_size_kb", "options/overwrite"]
        watched += ["tracing_cpumask", "set_event_pid", "current_tracer"]
        watched += [f"events/block/{e}/{f}" for e in EVENTS for f in ("enable", "filter")]
        _write(p / "tracing_on", "1")
        for name in watched:
            if (p / name).exists():
                fd = os.open(p / name, os.O_RDONLY)
                self._settings.append((name, fd, os.pread(fd, 65536, 0)))
        got = {n: v for n, _, v in self._settings}
        if got.get("tracing_on") != b"1\n" or any(got.get(f"events/block/{e}/enable") != b"1\n" for e in EVENTS):
            raise TrackingLost(f"the trace instance {p} did not switch on")
        if b"[mono]" not in got.get("trace_clock", b""):
            raise TrackingLost("the trace instance did not take the mono clock")
        if got.get("options/overwrite") != b"0\n":
            raise TrackingLost("the trace instance did not turn overwrite off")
        marker = f"standby-tracker start {self.instance} {os.getpid()} {os.urandom(8).hex()}".encode()
        self._parser = PageParser(header, layouts, marker_id, marker, target.dev, target.start, target.size)
        fd = os.open(p / "trace_marker", os.O_WRONLY)
        try:
            os.write(fd, marker)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop recording and remove the instance. Idempotent; safe after a failed start."""
        for _, raw, st in self._cpus:
            os.close(raw)
            os.close(st)
        for _, fd, _ in self._settings:
            os.close(fd)
        self._cpus, self._settings, self._parsed, self._parser = [], [], {}, None
        if self._created:
            self._created = False
            _remove_instance(self.path, stop_first=True)

    def now_ns(self) -> int:
        return time.monotonic_ns()  # the clock of trace_clock "mono"

    # -- polling --------------------------------------------------------------------------------------------
    def poll(self) -> list[tuple[int, int, int]]:
        """Everything recorded since the last poll, sorted by time; raises TrackingLost on any doubt."""
        if self._lost:
            raise TrackingLost(self._lost)
        if self._parser is None:
            raise TrackingLost("the tracker is not started")
        t0 = time.thread_time()
        try:
            out = self._drain(self._parser)
            self._check()
        except TrackingLost as exc:
            self._lost = str(exc)
            raise
        except OSError as exc:
            self._lost = f"reading trace instance {self.path} failed: {exc}"
            raise TrackingLost(self._lost) from exc
        finally:
            self.stats["cpu_seconds"] += time.thread_time() - t0
        out.sort()
        s = self.stats
        s["polls"] += 1
        s["events"] += len(out)
        s["max_events_per_poll"] = max(s["max_events_per_poll"], len(out))
        return out

    def take_queued(self) -> list[tuple[int, int, int]]:
        """Write submissions (time, start, end) parsed since the last call (by the polls in between)."""
        if self._parser is None:
            return []
        q, self._parser.queued = self._parser.queued, []
        return q

    def _drain(self, parser: PageParser) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        page, parsed, s = self._page, self._parsed, self.stats
        size = len(page)
        for cpu, fd, _ in self._cpus:
            pages = 0
            while pages < self._max_pages:
                try:
                    n = os.readv(fd, [page])
                except BlockingIOError:
                    break
                if n == 0:
                    break
                if n != size:
                    raise TrackingLost(f"cpu{cpu}: short read of a ring-buffer page ({n} of {size} bytes)")
                pages += 1
                parsed[cpu] += parser.parse(page, out, cpu)
            s["pages"] += pages
            s["bytes_read"] += pages * size
            s["max_page_fill"] = max(s["max_page_fill"], pages * size / self._buffer_bytes)
        s["records"] = sum(parsed.values())
        s["discarded"], s["unmatched"] = parser.discarded, parser.unmatched
        return out

    def _check(self) -> None:
        if not self._marker_checked:
            if not self._parser or not self._parser.marker_seen:
                raise TrackingLost("the start marker was not found in the trace buffer (was it reset?)")
            self._marker_checked = True
        for name, fd, value in self._settings:
            now = os.pread(fd, 65536, 0)
            if now != value:
                old, new = value.decode(errors="replace").strip(), now.decode(errors="replace").strip()
                raise TrackingLost(f"the trace instance's {name} changed from {old!r} to {new!r}")
        for cpu, _, fd in self._cpus:
            st = dict(line.split(":", 1) for line in os.pread(fd, 4096, 0).decode().splitlines() if ":" in line)
            for key in _STATS_MUST_BE_ZERO:
                if int(st.get(key, "0")):
                    raise TrackingLost(f"cpu{cpu}: the kernel ring buffer reports {key} {int(st[key])}")
            if int(st["read events"]) != self._parsed[cpu]:
                raise TrackingLost(
                    f"cpu{cpu}: the kernel handed out {int(st['read events'])} events, the tracker parsed "
                    f"{self._parsed[cpu]} (another reader, or a buffer reset)"
                )
        if not self.path.is_dir():
            raise TrackingLost(f"the trace instance {self.path} disappeared")
