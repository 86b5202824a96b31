"""The fault campaign (issue 9): random faults under live workloads, and after each one every new recovery
point judged, status checked against what is true, and at the end source == replica byte for byte.

A trial: pick a fault kind (seeded), start a storm of writes, inject the fault at a random moment, undo
it, then wait (bounded) until every disk has a recovery point made after the recovery — the longest RPO
seen meanwhile is the trial's "RPO after the fault". Then judge:

- machine src (disk0) is paused at a point; the points listed must include every point seen before
  (only the oldest may go, by space pressure) with the same instant; every new point, and a sample of
  older ones, is materialised from the replica and the retention journal and judged by the write-order
  checker (the same N as before, N never decreasing with time); the burst region of the replica must be
  the source at the newest point's instant (judge.BurstModel); status must name that point and its
  sequence; then applying resumes. Every `tf_every` trials one point also goes through the product's
  test failover and is judged again.
- machine fs (disk1): its points are checked the same way (lost, changed); every `fs_every` trials a point
  is materialised by test failover and its file system checked with e2fsck.

Failures are recorded with the trial, the fault and what differed, and the campaign goes on (or stops at
the first one, for debugging). A disk that stops making points is healed (restart the master target and
process server, then a resync); one that cannot be healed is set aside (wedged) and the campaign goes on
with the other machine — or ends, if it is src. At the end the workloads stop, the replicas must catch
up, and source and replica must be equal byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.plumbing.errors import RequestFailed, StandbyError
from tests import writeorder
from tests.journalcheck import disk_key, walk_points

from .faults import KINDS, FaultFailure, TrialContext
from .judge import BLOCK, ClippedImage, compare_region, diff_devices, fsck_image
from .report import Failure, build_report, log_excerpt, num, summarize, summary
from .rig import DAEMONS, MACHINES, ORDER_SLOTS, RESYNC_LINE, Rig, order_check

REGION = ORDER_SLOTS * BLOCK


@dataclass
class Settings:
    """Campaign knobs, from STANDBY_FAULT_* environment variables (see test_campaign.py)."""

    trials: int = 30
    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    report: Path | None = None
    stop_first: bool = False
    recover_timeout: float = 60.0
    storm_max: int = 96
    fs_every: int = 10
    tf_every: int = 10
    rotate_every: int = 50
    old_sample: int = 5
    budget: float = 900.0  # seconds of trials; then the campaign goes to its final checks
    agent_options: dict[str, Any] = field(default_factory=dict)
    volumes: dict[str, int] = field(default_factory=dict)  # "cache"/"retention" -> bytes (default: rig's)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        kinds = [k.strip() for k in e.get("STANDBY_FAULT_KINDS", "").split(",") if k.strip()] or list(KINDS)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
        options: dict[str, Any] = {"cut_interval": float(e.get("STANDBY_FAULT_CUT_INTERVAL", "0.5"))}
        volumes = {k: int(e[f"STANDBY_FAULT_{k.upper()}_MIB"]) * 1024 * 1024
                   for k in ("cache", "retention") if e.get(f"STANDBY_FAULT_{k.upper()}_MIB")}
        if e.get("STANDBY_FAULT_BATCH"):
            options["batch_size"] = e["STANDBY_FAULT_BATCH"]
        trials = int(e.get("STANDBY_FAULT_TRIALS", "30"))
        return cls(
            trials=trials,
            budget=float(e.get("STANDBY_FAULT_BUDGET", str(max(900, 30 * trials)))),
            # A fixed default: CI runs the same schedule every time (timing still varies); a long run or a
            # hunt for new failures sets its own.
            seed=int(e.get("STANDBY_FAULT_SEED", "20261205")),
            kinds=kinds,
            report=Path(e["STANDBY_FAULTS_REPORT"]) if e.get("STANDBY_FAULTS_REPORT") else None,
            stop_first=e.get("STANDBY_FAULT_STOP_FIRST", "") not in ("", "0"),
            recover_timeout=float(e.get("STANDBY_FAULT_RECOVER_TIMEOUT", "60")),
            storm_max=int(e.get("STANDBY_FAULT_STORM_MIB", "96")),
            rotate_every=int(e.get("STANDBY_FAULT_ROTATE", "50")),
            fs_every=int(e.get("STANDBY_FAULT_FS_EVERY", "10")),
            tf_every=int(e.get("STANDBY_FAULT_TF_EVERY", "10")),
            agent_options=options,
            volumes=volumes,
        )


class StopCampaign(Exception):
    """Stop at the first failure (STANDBY_FAULT_STOP_FIRST)."""


class Wedged(Exception):
    """Machine src cannot be brought back: nothing more can be judged."""


@dataclass
class PointBook:
    """Every point of one disk the campaign has seen, and the N each judged one had."""

    seen: dict[int, float] = field(default_factory=dict)  # sequence -> instant
    judged: dict[int, tuple[int, int]] = field(default_factory=dict)  # sequence -> (write-order run, N)
    skipped: set[int] = field(default_factory=set)  # not judgeable (before the workload, or while formatting)
    bad: set[int] = field(default_factory=set)  # judged inconsistent (reported once)
    pruned: int = 0


class Campaign:
    def __init__(self, rig: Rig, settings: Settings, out: Callable[[str], None] = print) -> None:
        self.rig = rig
        self.s = settings
        self.out = out
        self.rng = random.Random(settings.seed)
        self.failures: list[Failure] = []
        self.trials: list[dict[str, Any]] = []
        self.books = {m: PointBook() for m in MACHINES}
        self.points_judged = 0
        self.fs_points_checked = 0
        self.inconsistent = 0
        self.lost = 0
        self.differences = 0
        self.resyncs: list[dict[str, Any]] = []
        self.heals: list[dict[str, Any]] = []
        self.wedged: dict[str, str] = {}
        self.aborted = ""
        self.tracebacks: dict[str, int] = {}
        self.stale_seen: list[tuple[int, set[tuple[int, Any]]]] = []  # (trial, stale slots) reported
        self.lost_reported: set[int] = set()  # burst writes already reported missing
        self._key: tuple[bytes, Any] | None = None
        self.started = time.time()
        self.setup_seconds = 0.0

    # -- recording ----------------------------------------------------------------------------------
    def fail(self, trial: int, fault: str, check: str, message: str) -> None:
        f = Failure(trial, fault, check, message)
        self.failures.append(f)
        self.out("FAILURE " + f.line())
        if self.s.stop_first:
            raise StopCampaign(f.line())

    # -- the run ------------------------------------------------------------------------------------
    def schedule(self) -> list[str]:
        """Kinds in shuffled rounds, so every kind comes up about equally often in a short run."""
        out: list[str] = []
        while len(out) < self.s.trials:
            round_ = list(self.s.kinds)
            self.rng.shuffle(round_)
            out += round_
        return out[: self.s.trials]

    def run(self) -> None:
        t = time.monotonic()
        self.rig.setup()
        self.rig.start_workloads()
        self.setup_seconds = time.monotonic() - t
        self.out(f"set-up {self.setup_seconds:.1f} s; seed {self.s.seed}; kinds {','.join(self.s.kinds)}")
        deadline = time.monotonic() + self.s.budget
        try:
            for i, kind in enumerate(self.schedule(), start=1):
                if time.monotonic() > deadline:
                    self.aborted = f"time budget of {self.s.budget:.0f} s used up after {i - 1} trials"
                    self.fail(i, kind, "budget", f"{self.aborted} (stalls and heals take minutes each)")
                    break
                self.trial(i, kind)
                if i % self.s.rotate_every == 0 and i < self.s.trials:
                    self.rig.order.start()  # a new write-order log: judging stays fast in a long run
        except Wedged as exc:
            self.aborted = str(exc)
            self.out(f"campaign ended early: {exc}")
        self.finish()

    def trial(self, i: int, kind: str) -> None:
        rig = self.rig
        c = TrialContext(rig, self.rng, i, kind, self.s.storm_max, logs_at=rig.log_sizes())
        t0 = time.time()
        try:
            KINDS[kind](c)
        except FaultFailure as exc:
            self.fail(i, kind, "recover", str(exc))
        except (StandbyError, OSError, RuntimeError) as exc:
            self.fail(i, kind, "recover", f"injecting or undoing the fault failed: {exc}")
        finally:
            for key in list(rig.dep.procs):
                rig.cont(key)
            rig.remove_ballast(rig.cache_mnt)
            rig.remove_ballast(rig.retention_mnt)
        self.restart_dead(i, kind, c)
        rig.bursts.wait_storm(60)
        if rig.bursts.error:
            raise RuntimeError(f"the burst writer failed: {rig.bursts.error}")
        since = time.time()
        stuck, rpo, took = self.wait_recovered(i, kind, c, since, self.s.recover_timeout)
        if stuck:
            try:
                self.heal(i, kind, c, stuck)
            except Wedged:
                self.record(i, kind, c, t0, rpo, took, 0, [], 0.0)
                raise
        else:
            self.check_errors_cleared(i, kind)
        judged = self.points_judged
        t_judge = time.time()
        try:
            for judge in (self.judge_src, self.judge_fs):
                try:
                    judge(i, kind)
                except StopCampaign:
                    raise
                except Exception as exc:  # a request that fails or hangs is a finding; the campaign goes on
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    self.fail(i, kind, "judge", f"{judge.__name__} failed: {exc!r} (at {where.filename}:"
                              f"{where.lineno})")
        finally:
            if c.cleanup is not None:
                try:
                    c.cleanup()
                except (StandbyError, OSError) as exc:
                    self.fail(i, kind, "recover", f"undoing the fault after judging failed: {exc}")
        self.record(i, kind, c, t0, rpo, took, self.points_judged - judged, self.collect_logs(i, kind, c),
                    time.time() - t_judge)

    def record(self, i: int, kind: str, c: TrialContext, t0: float, rpo: float | None, took: float | None,
               judged: int, resyncs: list[dict[str, Any]], judging: float) -> None:
        rec = {
            "trial": i, "fault": kind, "target": c.target, "effective": c.effective, "detail": c.detail,
            "during": c.during, "rpo_after_fault": None if rpo is None else round(rpo, 2),
            "recovered_seconds": None if took is None else round(took, 2),
            "points_judged": judged, "resyncs": resyncs,
            "seconds": round(time.time() - t0, 2),
            "judge_seconds": round(judging, 2),
        }
        self.trials.append(rec)
        self.out(f"trial {i}/{self.s.trials} {kind} -> {c.target}: effective {c.effective}, RPO after fault "
                 f"{num(rec['rpo_after_fault'])} s, recovered in {num(rec['recovered_seconds'])} s, "
                 f"{rec['points_judged']} points judged, {len(resyncs)} resync(s), {rec['seconds']:.1f} s "
                 f"({rec['judge_seconds']:.1f} s judging)")

    def restart_dead(self, i: int, kind: str, c: TrialContext) -> None:
        """A daemon that exited by itself is a failure (nothing in the campaign stops one without
        starting it again); start it so the campaign can go on."""
        gone = {k: f"exited with code {code}" for k, code in self.rig.dead_daemons().items()}
        gone |= {k: "is not running (starting it after the fault failed)"
                 for k in DAEMONS if k not in self.rig.dep.procs}
        for key, why in gone.items():
            self.fail(i, kind, "daemon-exited", f"{key} {why}: {log_excerpt(c.new_log(key))}")
            try:
                self.rig.dep.procs.pop(key, None)
                self.rig.start(key)
            except StandbyError as exc:
                raise Wedged(f"{key} does not start again: {exc}") from None

    # -- recovery -----------------------------------------------------------------------------------
    def wait_recovered(self, i: int, kind: str, c: TrialContext, since: float,
                       timeout: float) -> tuple[list[str], float | None, float | None]:
        """Wait until every disk (not set aside) has a point made after `since`. Returns (machines that
        did not get there, the longest RPO seen, seconds it took)."""
        machines = [m for m in MACHINES if m not in self.wedged]
        deadline = time.monotonic() + timeout
        rpo: float | None = None
        last: dict[str, dict[str, Any] | None] = {}
        flagged = False
        while True:
            self.restart_dead(i, kind, c)
            st = self.rig.status(timeout=5)
            if st is not None:
                last = {m: self.rig.disk_status(st, m) for m in machines}
                for m, d in last.items():
                    if d is None:
                        continue
                    if d.get("rpo_seconds") is not None:
                        rpo = max(rpo or 0.0, float(d["rpo_seconds"]))
                    if d["applied_seq"] > d["received_seq"] and not flagged:
                        flagged = True
                        self.fail(i, kind, "status", f"{m}: applied_seq {d['applied_seq']} > received_seq "
                                  f"{d['received_seq']} ({summarize(d)})")
                stuck = [m for m, d in last.items() if d is None or (d.get("last_point_time") or 0) < since]
                if not stuck:
                    return [], rpo, time.time() - since
            else:
                stuck = machines
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        for m in stuck:
            d = last.get(m)
            silent = d is not None and not d.get("error") and not d.get("alerts")
            logs = "; ".join(f"{k}: {log_excerpt(c.new_log(k), 3)}" for k in ("mt-mt1", "ps", f"agent-{m}"))
            self.fail(i, kind, "stalled",
                      f"{m}/{MACHINES[m]} made no recovery point within {timeout:.0f} s after the fault was undone"
                      f"{' and status shows no error or alert (a silent stall)' if silent else ''}; "
                      f"status: {summarize(d)}; logs: {logs}")
        return stuck, rpo, None

    def check_errors_cleared(self, i: int, kind: str, grace: float = 10.0) -> None:
        """Every disk made a point after the fault was undone: an error still shown is stale (issue 9:
        errors stay in status after the condition cleared). Alerts are not judged here: a space-pressure
        alert rightly stays up for a while after the pruning it reports."""
        deadline = time.monotonic() + grace
        shown: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.rig.status(timeout=5)
            if st is not None:
                shown = {m: (self.rig.disk_status(st, m) or {}).get("error") for m in MACHINES if m not in self.wedged}
                if not any(shown.values()):
                    return
            time.sleep(0.5)
        for m, err in shown.items():
            if err:
                self.fail(i, kind, "stale-error", f"{m}/{MACHINES[m]} made points again after the fault was undone, "
                          f"but {grace:.0f} s later status still shows the error {str(err)[:400]!r}")

    def heal(self, i: int, kind: str, c: TrialContext, stuck: list[str]) -> None:
        """Bring stalled disks back so the campaign can go on: restart the master target and the process
        server (SIGTERM), then ask for a resync; a disk that still makes no point is set aside."""
        steps: list[str] = []
        for step in ("restart", "resync"):
            if step == "restart":
                self.rig.restart("mt-mt1")
                self.rig.restart("ps")
            else:
                for m in stuck:
                    try:
                        self.rig.admin_call("resync", machine=m)
                    except Exception as exc:  # the request itself may be what is broken: note it, go on
                        steps.append(f"resync {m} refused: {exc}")
            since = time.time()
            left, _, _ = self.wait_recovered_quiet(since, stuck, 60.0)
            steps.append(f"{step}: {'still stalled: ' + ','.join(left) if left else 'recovered'}")
            stuck = left
            if not stuck:
                break
        self.heals.append({"trial": i, "fault": kind, "steps": steps})
        self.out(f"heal after trial {i}: {steps}")
        for m in stuck:
            self.wedged[m] = f"stalled after trial {i} ({kind}); neither a restart nor a resync helped"
            if m == "src":
                raise Wedged(self.wedged[m])

    def wait_recovered_quiet(self, since: float, machines: list[str], timeout: float
                             ) -> tuple[list[str], None, None]:
        deadline = time.monotonic() + timeout
        stuck = machines
        while time.monotonic() < deadline:
            st = self.rig.status(timeout=5)
            if st is not None:
                stuck = [m for m in machines
                         if ((self.rig.disk_status(st, m) or {}).get("last_point_time") or 0) < since]
                if not stuck:
                    break
            time.sleep(0.5)
        return stuck, None, None

    # -- judging ------------------------------------------------------------------------------------
    def pause(self, machine: str, timeout: float = 60.0) -> dict[str, Any] | None:
        """Stop applying at the machine's next point; its status once paused (None: not in time)."""
        self.rig.admin_call("pause", machine=machine)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.rig.status(timeout=5)
            d = self.rig.disk_status(st, machine) if st else None
            if d is not None and d.get("applying") == "paused":
                return d
            time.sleep(0.1)
        return None

    def check_listing(self, i: int, kind: str, machine: str, pts: list[dict[str, Any]]) -> None:
        """Points seen before are still listed with the same instant — except the oldest, which space
        pressure may prune (only oldest first: every point is kept for a day by the rig's tiers)."""
        book = self.books[machine]
        where = f"{machine}/{MACHINES[machine]}"
        if not pts:
            self.fail(i, kind, "points", f"{where}: no recovery point listed")
            return
        listed = {p["sequence"]: float(p["time"]) for p in pts}
        oldest = min(listed)
        lost = sorted(s for s in book.seen if s not in listed and s > oldest)
        if lost:
            self.lost += len(lost)
            self.fail(i, kind, "lost-points", f"{where}: {len(lost)} point(s) seen before are no longer listed "
                      f"though newer than the oldest listed ({oldest}): {lost[:10]}")
        changed = [s for s, t in listed.items() if s in book.seen and abs(book.seen[s] - t) > 1e-6]
        if changed:
            self.lost += len(changed)
            self.fail(i, kind, "changed-points", f"{where}: point(s) {changed[:10]} now have another instant")
        seqs = [p["sequence"] for p in pts]
        times = [float(p["time"]) for p in pts]
        if seqs != sorted(seqs) or any(b < a for a, b in zip(times, times[1:], strict=False)):
            self.fail(i, kind, "points-order", f"{where}: points not in order of sequence and time: "
                      f"{list(zip(seqs, times, strict=True))[:20]}")
        for s in [s for s in book.seen if s not in listed and s < oldest]:
            del book.seen[s]
            book.pruned += 1
            book.judged.pop(s, None)
        book.seen.update(listed)

    def journal_key(self) -> tuple[bytes, Any]:
        if self._key is None:
            d = self.rig.disks["src"]
            self._key = disk_key(self.rig.dep.ps_dir, self.rig.dep.root / "mt-mt1", d.disk_id)
        return self._key

    def judge_src(self, i: int, kind: str) -> None:
        if "src" in self.wedged:
            return
        rig = self.rig
        disk = rig.disks["src"]
        d = self.pause("src")
        try:
            if d is None:
                st = rig.status()
                self.fail(i, kind, "pause", f"src/disk0 did not pause at a point within 60 s; status: "
                          f"{summarize(rig.disk_status(st, 'src') if st else None)}")
                return
            listing = rig.admin_call("points", machine="src")["disks"][0]
            pts = listing["points"]
            self.check_listing(i, kind, "src", pts)
            if not pts:
                return
            newest = pts[-1]
            if d.get("last_point_seq") != newest["sequence"] or d.get("applied_seq") != newest["sequence"]:
                self.fail(i, kind, "status", f"src/disk0 is paused but status names point "
                          f"{d.get('last_point_seq')} and applied_seq {d.get('applied_seq')} while the newest "
                          f"listed point is {newest['sequence']}")
                return
            self.judge_burst_region(i, kind, disk.replica, newest)
            self.judge_points(i, kind, disk.replica, pts)
            if i % self.s.tf_every == 0:
                self.judge_by_test_failover(i, kind)
        finally:
            try:
                rig.admin_call("resume", machine="src")
            except Exception as exc:  # resume must be tried; a failure to resume is reported, not raised
                self.fail(i, kind, "resume", f"src could not be resumed: {exc}")

    def judge_burst_region(self, i: int, kind: str, replica: Path, newest: dict[str, Any]) -> None:
        exp = self.rig.model.expected_at(float(newest["time"]))
        if exp is None:
            self.fail(i, kind, "points-order", f"the newest point {newest['sequence']} is older than a newest "
                      f"point judged before ({self.rig.model.folded_until:.3f})")
            return
        with open(replica, "rb", buffering=0) as f:
            diff = compare_region(lambda off, n: os.pread(f.fileno(), n, off), exp)
        if diff.blocks:
            self.inconsistent += 1
            known = diff.lost_writes <= self.lost_reported and not diff.future
            self.lost_reported |= diff.lost_writes
            what = "not-an-instant" if diff.future and not diff.lost_writes else "lost-writes"
            if known:
                self.out(f"trial {i}: the replica still lacks writes reported missing before ({diff.blocks} blocks)")
                return
            self.fail(i, kind, what, f"src/disk0 paused at point {newest['sequence']} (instant "
                      f"{newest['time']:.3f}): {diff.describe()}")

    def judge_points(self, i: int, kind: str, replica: Path, pts: list[dict[str, Any]]) -> None:
        """Materialise every new point (and a sample of older ones) and judge it by the write order."""
        book = self.books["src"]
        order = self.rig.order
        new: set[int] = set()
        for p in pts:
            s = p["sequence"]
            if s in book.judged or s in book.skipped or s in book.bad:
                continue
            if order.run_at(float(p["time"])) is None:
                book.skipped.add(s)
            else:
                new.add(s)
        old = [p["sequence"] for p in pts if p["sequence"] in book.judged]
        sample = set(self.rng.sample(old, min(len(old), self.s.old_sample)))
        want = new | sample
        if not want:
            return
        times = {p["sequence"]: float(p["time"]) for p in pts}
        key, uid = self.journal_key()
        with open(replica, "rb") as f:
            image = ClippedImage(f.read(REGION), REGION)
        judged: set[int] = set()
        bad: list[tuple[int, int, dict[str, Any]]] = []  # (sequence, run, verdict), newest first
        newer: tuple[int, int, int] | None = None  # (sequence, run, N) of the last point judged (newest first)
        logs: dict[int, writeorder.WriteLog] = {}
        snap = self.snapshot_journal(uid)
        if snap is None:
            self.fail(i, kind, "journal", "src/disk0: the retention journal could not be copied (5 tries)")
            return
        try:
            for seq, img in walk_points(snap, self.rig.disks["src"].disk_id, key, uid,
                                        image, want, oldest=min(want)):  # type: ignore[arg-type]
                run = order.run_at(times[seq])
                if run is None:
                    continue
                if run.number not in logs:  # read once per trial: it is the same file for every point
                    logs[run.number] = writeorder.WriteLog.read(run.log)
                verdict = writeorder.check(bytes(img.buf), 0, ORDER_SLOTS, logs[run.number])
                judged.add(seq)
                self.points_judged += 1
                if not verdict.consistent:
                    self.inconsistent += 1
                    book.bad.add(seq)
                    if seq in book.judged:
                        self.lost += 1
                        self.fail(i, kind, "changed-points", f"src/disk0 point {seq} was N={book.judged[seq][1]} "
                                  f"when first judged, now it is inconsistent: {verdict.to_json()[:500]}")
                    else:
                        bad.append((seq, run.number, verdict.to_dict()))
                    continue
                n = verdict.cut_lo
                assert n is not None
                if seq in book.judged and book.judged[seq] != (run.number, n):
                    self.lost += 1
                    self.fail(i, kind, "changed-points", f"src/disk0 point {seq} was N={book.judged[seq][1]} "
                              f"when first judged, now N={n}")
                book.judged[seq] = (run.number, n)
                if newer is not None and newer[1] == run.number and n > newer[2]:
                    self.fail(i, kind, "points-order", f"src/disk0 point {seq} (N={n}) holds more records than "
                              f"the newer point {newer[0]} (N={newer[2]})")
                newer = (seq, run.number, n)
        except Exception as exc:  # whatever the journal reader raises, the journal is not readable: a finding
            self.fail(i, kind, "journal", f"src/disk0: walking the retention journal failed: {exc!r}")
            return
        finally:
            shutil.rmtree(snap, ignore_errors=True)
        if bad:
            self.report_inconsistent(i, kind, bad, times, len(judged))
        missing = want - judged
        if missing:
            listed_now = {p["sequence"] for p in self.rig.admin_call("points", machine="src")["disks"][0]["points"]}
            vanished = {s for s in missing if s not in listed_now}
            book.pruned += len(vanished)
            for s in vanished:
                book.seen.pop(s, None)
            rest = sorted(missing - vanished)
            if rest:
                self.fail(i, kind, "journal", f"src/disk0: points {rest[:10]} are listed but the journal walk "
                          "did not reach them")

    def snapshot_journal(self, uid: Any) -> Path | None:
        """A private copy of the disk's journal directory (walk_points copies it again, from here). The
        master target may prune a segment while it is copied (upkeep goes on while applying is paused):
        then copy again."""
        snap = Path(tempfile.mkdtemp(dir=self.rig.root, prefix="journal-"))
        for _ in range(5):
            try:
                shutil.copytree(self.rig.retention_dir / str(uid), snap / str(uid))
                return snap
            except OSError:
                shutil.rmtree(snap / str(uid), ignore_errors=True)
                time.sleep(0.2)
        shutil.rmtree(snap, ignore_errors=True)
        return None

    def report_inconsistent(self, i: int, kind: str, bad: list[tuple[int, int, dict[str, Any]]],
                            times: dict[int, float], judged: int) -> None:
        """One failure per trial for its inconsistent points, described by the oldest (where it began).
        A lost write leaves a stale slot until the workload rewrites it, so later points repeat the same
        stale slots: say so rather than describe the same loss again."""
        seq, run, v = bad[-1]
        sig = {(r["slot"], r["found"]) for _, _, vv in bad for r in vv["reasons"]
               if r.get("kind") in ("stale", "future")}
        before = [t for t, old in self.stale_seen if sig & old]
        known = set().union(*(old for _, old in self.stale_seen)) if self.stale_seen else set()
        self.stale_seen.append((i, sig))
        if sig and sig <= known and all(not vv["torn"] and not vv["foreign"] for _, _, vv in bad):
            self.out(f"trial {i}: {len(bad)} more points inconsistent by the stale slots reported before")
            return
        again = f" (some stale slots as reported in trial {before[0]})" if before else ""
        self.fail(i, kind, "inconsistent-point",
                  f"{len(bad)} of {judged} src/disk0 points judged are not the source at one instant{again} "
                  f"(sequences {sorted(s for s, _, _ in bad)[:12]}); the oldest, point {seq} (instant "
                  f"{times[seq]:.3f}, write-order run {run}): best cut {v['best_cut']}, {v['mismatched']} of "
                  f"{ORDER_SLOTS} slots off it (torn {v['torn']}, foreign {v['foreign']}, unwritten "
                  f"{v['unwritten']}); reasons {json.dumps(v['reasons'][:4])}")

    def judge_by_test_failover(self, i: int, kind: str) -> None:
        """One judged point through the product's own path: test failover, then the write-order judge."""
        book = self.books["src"]
        if not book.judged:
            return
        seq = self.rng.choice(sorted(book.judged))
        try:
            res = self.rig.admin_call("test_failover", timeout=300, machine="src", point=str(seq), at=None,
                                      directory=None)
        except RequestFailed as exc:
            # Space pressure may prune the oldest points while newer ones are materialised (the other disk's
            # history makes room too): a point no longer listed is pruned, not lost (check_listing holds the
            # rule that only the oldest may go).
            listed = {p["sequence"] for p in self.rig.admin_call("points", machine="src")["disks"][0]["points"]}
            if seq in listed or "no recovery point" not in str(exc):
                raise
            book.judged.pop(seq, None)
            self.out(f"trial {i}: point {seq} was pruned before its test failover; none this time")
            return
        try:
            path = Path(res["disks"][0]["path"])
            run = next(r for r in self.rig.order.runs if r.number == book.judged[seq][0])
            with open(path, "rb") as f:
                v = order_check(f.read(REGION), run)
            self.points_judged += 1
            if not v.consistent or v.cut_lo != book.judged[seq][1]:
                self.inconsistent += 1
                self.fail(i, kind, "test-failover", f"src/disk0 test failover to point {seq}: expected N="
                          f"{book.judged[seq][1]}, verdict {v.to_json()[:600]}")
        finally:
            self.rig.admin_call("test_failover_cleanup", machine="src")

    def judge_fs(self, i: int, kind: str) -> None:
        if "fs" in self.wedged:
            return
        listing = self.rig.admin_call("points", machine="fs")["disks"][0]
        pts = listing["points"]
        book = self.books["fs"]
        new = [p for p in pts if p["sequence"] not in book.seen]
        self.check_listing(i, kind, "fs", pts)
        if i % self.s.fs_every or not pts:
            return
        p = self.rng.choice(new or pts)
        res = self.rig.admin_call("test_failover", timeout=300, machine="fs", point=str(p["sequence"]), at=None,
                                  directory=None)
        try:
            ok, out = fsck_image(Path(res["disks"][0]["path"]))
            self.fs_points_checked += 1
            if not ok:
                self.inconsistent += 1
                self.fail(i, kind, "fsck", f"fs/disk1 point {p['sequence']} (instant {p['time']:.3f}) has a "
                          f"damaged file system: {out}")
        finally:
            self.rig.admin_call("test_failover_cleanup", machine="fs")

    def collect_logs(self, i: int, kind: str, c: TrialContext) -> list[dict[str, Any]]:
        """Resyncs started during the trial (from the agents' logs, with their reasons) and tracebacks."""
        found = []
        for m in MACHINES:
            for mo in RESYNC_LINE.finditer(c.new_log(f"agent-{m}")):
                r = {"trial": i, "fault": kind, "machine": m, "disk": mo.group(1), "mode": mo.group(2),
                     "reason": mo.group(4).strip()}
                found.append(r)
        self.resyncs += found
        for key in DAEMONS:
            n = c.new_log(key).count("Traceback")
            if n:
                self.tracebacks[key] = self.tracebacks.get(key, 0) + n
        return found

    # -- the end ------------------------------------------------------------------------------------
    def finish(self) -> None:
        rig = self.rig
        try:
            if "src" not in self.wedged:
                self.judge_src(-1, "final")
        except StopCampaign:
            raise
        except Exception as exc:  # as in a trial: a failing request is a finding, the final checks go on
            self.fail(-1, "final", "judge", f"judging src before the end failed: {exc!r}")
        rig.stop_workloads()
        end = time.time()
        caught_up: set[str] = set()
        for m, disk in rig.disks.items():
            if m in self.wedged:
                self.out(f"{m}: set aside ({self.wedged[m]}); no final comparison")
                continue
            # After an early end (a machine set aside) the other may be blocked by the first one's backlog in
            # the shared cache: say so, and do not wait as long.
            note = f"(after the campaign ended early: {self.aborted}) " if self.aborted else ""
            wait = 60 if self.aborted else 180
            try:
                rig.dep.wait_caught_up(m, end, timeout=wait)
                caught_up.add(m)
            except StandbyError as exc:
                self.fail(-1, "final", "catch-up", f"{note}{m}/{disk.name} did not catch up within {wait} s after "
                          f"the workload stopped: {str(exc)[:900]}")
            diff = diff_devices(disk.dev, disk.replica, disk.size)
            if diff.blocks:
                self.differences += diff.blocks
                self.fail(-1, "final", "source-replica", f"{note}{m}/{disk.name} after catch-up: {diff.describe()}")
        if "src" in caught_up and rig.order.runs:
            run = rig.order.runs[-1]
            with open(rig.disks["src"].replica, "rb") as f:
                v = order_check(f.read(REGION), run)
            last = writeorder.WriteLog.read(run.log).last
            if not v.explains(last):
                self.fail(-1, "final", "write-order", f"src/disk0's replica is not at the last record {last}: "
                          f"{v.to_json()[:600]}")
        if "fs" in caught_up:  # a replica that did not catch up is not the unmounted file system
            ok, out = fsck_image(rig.disks["fs"].replica, replay=False)
            if not ok:
                self.fail(-1, "final", "fsck", f"fs/disk1's replica after a clean unmount and catch-up: {out}")

    # -- the report ---------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return build_report(self)

    def summary(self, rep: dict[str, Any]) -> str:
        return summary(rep)
