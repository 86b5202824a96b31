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
parses them (``agent.tracker.ringbuffer.PageParser``) and returns the written byte ranges. It then checks that it can
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

The ring buffer's page format and its parser are in agent.tracker.ringbuffer.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .base import TrackingLost
from .ringbuffer import SECTOR, EventLayout, HeaderLayout, PageParser

EVENTS = ("block_rq_complete", "block_bio_complete", "block_bio_queue")
KERNEL_MINOR_BITS = 20  # dev_t inside the kernel (and so in trace events) is major << 20 | minor
_STATS_MUST_BE_ZERO = ("overrun", "commit overrun", "dropped events")


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

    name = "tracefs"  # as the config's `tracker` choice, status and logs name it
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
        # Events the kernel reported lost (overrun, commit overrun, dropped), summed over every start of this
        # tracker: each loss is also a TrackingLost (and a resync); this says how many writes it was about.
        self.events_lost = 0

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
            lost = {key: int(st.get(key, "0")) for key in _STATS_MUST_BE_ZERO}
            for key, n in lost.items():
                if n:
                    self.events_lost += sum(lost.values())
                    raise TrackingLost(f"cpu{cpu}: the kernel ring buffer reports {key} {n}")
            if int(st["read events"]) != self._parsed[cpu]:
                raise TrackingLost(
                    f"cpu{cpu}: the kernel handed out {int(st['read events'])} events, the tracker parsed "
                    f"{self._parsed[cpu]} (another reader, or a buffer reset)"
                )
        if not self.path.is_dir():
            raise TrackingLost(f"the trace instance {self.path} disappeared")
