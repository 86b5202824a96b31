"""Fuzzing the master target's handlers: the test plays the process server toward a real `standby-mt`.

The master target dials the process server, so the fuzzer *is* one: a TLS listener on the deployment's
port with the deployment's own server identity (ps/identity, issued by the deployment CA for 127.0.0.1),
built on the real `Link`/`Connection`. The master target is enrolled by the real process server, which is
then stopped. The fake server hands out disks (data keys really wrapped to the master target's
certificate), answers its subscribe/pull/mt_report, and sends it:

- BATCH and MARKER records sealed with the disk's key — valid ones (initial copy, deltas, points), hostile
  ones past the seal (extent tables edited and sealed again, marker meta with `time` as a list, None, a
  string, 1e400...), out of order, for disks not pulled;
- requests: check_replica, resync_hashes, points, failover, test_failover..., with hostile arguments, and
  unknown ops;
- hostile answers to its own requests (a subscribe listing a disk whose uid is not a uuid, junk sizes,
  formats and keys; a pull answer with a junk skip_to);
- raw frames mutated with their checksums recomputed.

Safety: the master target runs as root and writes where it is told. Every path the fuzzer gives it lies in
the test's directory (relative paths resolve there: the daemon runs with it as working directory), and
sizes of preallocated kinds stay small.

Oracles: every record gets an ACK or a REJECT (or, for a gap, a new pull) within ANSWER_SECONDS; every
request a REPLY; a connection ends only with a GOODBYE; the master target keeps polling (a subscribe
at least every POLL_SECONDS) and reporting; its process stays alive; its log gains no traceback; and after
a restart at the end it reconnects and pulls its disks again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.admin.localdeploy import command
from standby.plumbing import identity as ident
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.tls import server_context
from standby.proto.connection import Connection, Role
from standby.proto.envelope import Sealer
from standby.proto.errors import ProtocolError, RemoteProtocolError
from standby.proto.frames import HEADER_SIZE, decode_header, encode_frame
from standby.proto.keywrap import wrap_key
from standby.proto.messages import Ack, BatchKind, FrameType, Hello, Reject, Reply, Request, Welcome, encode, meta_bytes
from tests.deploy import LocalDeployment

from . import engine
from .corpus import make_batch, make_marker
from .formats import mutate_batch_payload, mutate_meta
from .mutators import Raw, dumps, fix_frame, mutate_frame, mutate_json_value
from .sessionkit import ANSWER_SECONDS, Findings, Input, LogWatch
from .wire_targets import payload_mutator

MT_INPUTS = engine.env_int("STANDBY_FUZZ_MT_INPUTS", engine.LONG_INPUTS // 500 if engine.LONG_INPUTS else 1000)
MT_SECONDS = float(os.environ.get("STANDBY_FUZZ_MT_SECONDS", "0" if engine.LONG_INPUTS else "35"))
POLL_SECONDS = 10.0  # the master target subscribes every second (POLL_INTERVAL) plus the time a disk takes to open
REPORT_SECONDS = 20.0  # it reports every 5 s (UPKEEP_INTERVAL)
DISK_SIZE = 8 << 20
SMALL_KINDS = ("vmdk-thick", "vmdk-monolithic-flat", "device")  # preallocated or real: never a large size


@dataclass
class FakeDisk:
    id: int
    uid: uuid.UUID
    key: bytes
    path: str
    kind: str = "raw"
    size: int = DISK_SIZE
    generation: int = 1
    next_seq: int = 1
    phase: str = "initial"  # initial -> up-to-date once initial-complete is acked
    pulled: bool = False
    halted: bool = False  # failed over by us: nothing more is sent
    poisoned: str = ""  # why no more records go there (its worker stopped answering...)
    wrapped: bytes = b""

    def entry(self) -> dict[str, Any]:
        return {"disk": self.id, "machine": "fz-src", "name": f"d{self.id}", "uid": str(self.uid),
                "size": self.size, "replica_path": self.path, "replica_format": self.kind,
                "wrapped_key": base64.b64encode(self.wrapped).decode(), "seed": False}

    @property
    def usable(self) -> bool:
        return self.pulled and not self.halted and not self.poisoned


@dataclass
class Session:
    link: Link
    started: float
    answers: dict[tuple[int, int], Any] = field(default_factory=dict)
    replies: dict[int, Reply] = field(default_factory=dict)
    pulls: list[tuple[int, float]] = field(default_factory=list)
    closed: str = ""  # "" while open, else how it ended
    goodbye: bool = False
    history: list[Input] = field(default_factory=list)


class MTFuzz:
    def __init__(self, root: Path, seed: int = engine.SEED) -> None:
        self.rng = random.Random(f"{seed}:mt-sessions")
        self.root = root
        self.dep = LocalDeployment(root / "deploy")
        self.key = "mt-fz-mt"
        self.found = Findings("mt-sessions", lambda: self.dep.log_text(self.key))
        self.log = LogWatch(self.dep.logs / f"{self.key}.log")
        self.disks: dict[int, FakeDisk] = {}
        self.session: Session | None = None
        self.sessions = 0
        self.last_subscribe = 0.0
        self.last_report = 0.0
        self.hostile_subscribe: Any = None
        self.hostile_desc = self.last_hostile = ""
        self.hostile_pull: Any = None
        self.ids = 5000
        self.inputs = self.answered = self.closed = 0
        self.problems: list[tuple[str, str]] = []

    # -- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        dep = self.dep
        dep.init()
        dep.start("ps")
        dep.enroll("mt", "fz-mt")
        dep.kill("ps")  # enrolled: from now on the fuzzer is the process server
        self.server_identity = ident.Identity.load(dep.ps_dir / "identity", command="standby-ps init")
        self.mt_pub = ident.cert_public_key_pem((dep.root / "mt-fz-mt" / "identity" / "cert.pem").read_bytes())
        self.work = self.root / "mt-cwd"  # the master target's working directory: relative paths land here
        (self.work / "replicas").mkdir(parents=True)
        (self.work / "tf").mkdir()

    def start_mt(self) -> None:
        log = open(self.dep.logs / f"{self.key}.log", "ab")
        env = dict(os.environ, STANDBY_LOG_LEVEL=os.environ.get("STANDBY_LOG_LEVEL", "INFO"))
        proc = subprocess.Popen(command("mt", "run", "--dir", str(self.dep.root / "mt-fz-mt")), stdout=log,
                                stderr=log, env=env, stdin=subprocess.DEVNULL, cwd=self.work)
        log.close()
        self.dep.procs[self.key] = proc

    def new_disk(self, kind: str = "raw") -> FakeDisk:
        self.ids += 1
        uid = uuid.uuid4()
        key = os.urandom(32)
        d = FakeDisk(self.ids, uid, key, str(self.work / "replicas" / f"d{self.ids}.img"), kind)
        d.wrapped = wrap_key(key, self.mt_pub, b"disk:" + uid.bytes)
        self.disks[d.id] = d
        return d

    # -- the fake server -------------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(reader, writer, Connection(Role.SERVER), "mt")
        try:
            hello = await asyncio.wait_for(link.recv(), 15)
            if not isinstance(hello, Hello) or hello.role != "mt":
                await link.close("unexpected-message", "the fuzzer expects the master target")
                return
            await link.send(Welcome(1, "fz-mt", "mt"))
        except (LinkClosed, ProtocolError, TimeoutError, ConnectionError, OSError, ssl.SSLError):
            await link.close()
            return
        old = self.session
        if old is not None and not old.closed:
            await old.link.close("replaced", "a newer connection replaced this one")
        s = self.session = Session(link, time.monotonic())
        self.sessions += 1
        for d in self.disks.values():
            d.pulled = False  # a new session pulls every disk again before it takes records
        self.last_subscribe = self.last_report = time.monotonic()
        try:
            while True:
                msg = await link.recv()
                if isinstance(msg, Request):
                    await self.on_request(s, msg)
                elif isinstance(msg, Reply):
                    s.replies[msg.id] = msg
                elif isinstance(msg, Ack | Reject):
                    s.answers[(msg.disk, msg.sequence)] = msg
                    self.on_answer(msg)
        except LinkClosed as exc:
            s.closed, s.goodbye = str(exc) or "closed", "said goodbye" in str(exc)
        except RemoteProtocolError as exc:
            s.closed = f"the master target sent a frame our codec refuses: {exc.code}: {exc}"
            self.problems.append((f"mt: sent an invalid frame ({exc.code})", str(exc)))
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            s.closed = f"connection lost: {exc!r}"
        finally:
            s.closed = s.closed or "ended"
            await link.close()

    async def on_request(self, s: Session, req: Request) -> None:
        if req.op == "subscribe":
            self.last_subscribe = time.monotonic()
            # Disks taken out of play (failed over, poisoned) stay listed a while, then drop out of the list:
            # every new session opens every listed disk, and the run must not slow down as they pile up.
            dead = [d for d in self.disks.values() if d.halted or d.poisoned]
            listed = [d for d in self.disks.values() if not (d.halted or d.poisoned)] + dead[-4:]
            result: Any = {"disks": [d.entry() for d in listed], "cache_dir": "/nonexistent-cache",
                           "host": "fuzz-host"}
            if self.hostile_subscribe is not None:
                result, self.hostile_subscribe = self.hostile_subscribe(result), None
                self.hostile_desc = dumps(result)[-400:]
                s.history.append(Input("ps", "peer-answer", b"", f"subscribe answered with {dumps(result)[:400]}"))
            await self.reply(s, req.id, True, result)
        elif req.op == "pull":
            disk = req.args.get("disk")
            d = self.disks.get(disk) if isinstance(disk, int) else None
            s.pulls.append((disk if isinstance(disk, int) else -1, time.monotonic()))
            result = {"received_seq": 0, "skip_to": 0}
            if d is not None and s is self.session:  # a pull on a session being replaced pulls nothing
                d.pulled = True
                d.next_seq = int(req.args.get("applied_seq", 0)) + 1
            if self.hostile_pull is not None and d is not None:
                result, self.hostile_pull = self.hostile_pull, None
                d.poisoned = d.poisoned or "got a hostile pull answer"  # its sequence state is unknown now
                s.history.append(Input("ps", "peer-answer", b"", f"pull answered with {dumps(result)[:300]}"))
            s.history.append(Input("ps", "peer-answer", b"", f"pull {req.args} (request {req.id}) answered at "
                                                             f"{time.strftime('%H:%M:%S')}: {dumps(result)[:200]}"))
            await self.reply(s, req.id, True, result)
        elif req.op == "mt_report":
            self.last_report = time.monotonic()
            await self.reply(s, req.id, True, {})
        elif req.op == "about":  # which machine the master target runs on: nothing to fuzz on this side
            await self.reply(s, req.id, True, {})
        else:
            await self.reply(s, req.id, False, {}, "bad-input")

    async def reply(self, s: Session, rid: int, ok: bool, result: Any, code: str = "") -> None:
        frame = encode_frame(FrameType.REPLY, 0, 0, dumps({"id": rid, "ok": ok, "result": result, "code": code,
                                                           "message": "fuzz"}).encode())
        try:
            await asyncio.wait_for(s.link.send_frame(frame), ANSWER_SECONDS)
        except (LinkClosed, ProtocolError, TimeoutError, AttributeError):  # closed or stuck: the oracles see it
            pass

    def on_answer(self, msg: Ack | Reject) -> None:
        d = self.disks.get(msg.disk)
        if d is None:
            return
        if isinstance(msg, Ack) and msg.sequence == d.next_seq:
            d.next_seq += 1
        elif isinstance(msg, Reject) and msg.sequence:
            d.pulled = False  # the master target pulls it again after its retry delay

    # -- inputs ------------------------------------------------------------------------------------------------
    def gen(self) -> Input:
        rng = self.rng
        usable = [d for d in self.disks.values() if d.usable]
        live = [d for d in self.disks.values() if not d.halted and not d.poisoned]
        if len(live) < 3 and len(self.disks) < 200:
            self.new_disk()  # failovers and poisoned disks take disks out of play: keep three replicating
        r = rng.random()
        if usable and r < 0.6:
            return self.gen_record(rng.choice(usable))
        if r < 0.87:
            return self.gen_request()
        if r < 0.92:
            return Input("ps", "subscribe-answer", b"", "hostile subscribe answer", args=self.gen_subscribe())
        if r < 0.96:
            self.hostile_pull = rng.choice([{"skip_to": "x"}, {"skip_to": 10**400}, {"skip_to": [1]}, {"skip_to": None},
                                            {"skip_to": -5}, {"received_seq": {}}, {"skip_to": Raw("1e400")},
                                            {"skip_to": Raw("NaN")}, {"skip_to": {"a": 1}}, []])
            return Input("ps", "pull-answer", b"", f"the next pull is answered with {dumps(self.hostile_pull)[:100]}")
        base = rng.choice([encode(Request(self.next_id(), "wake", {})),
                           encode(Request(self.next_id(), "points", {"disk": next(iter(self.disks), 1)}))])
        frame = mutate_frame(rng, base, [], payload_mutator)
        try:
            if decode_header(frame).length != len(frame) - HEADER_SIZE:
                frame = fix_frame(frame)
        except ProtocolError:
            pass
        return Input("ps", "frame", frame, f"mutated frame ({len(frame)} bytes)")

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    def gen_record(self, d: FakeDisk) -> Input:
        rng = self.rng
        seq = d.next_seq
        sealer = Sealer(d.key, d.uid.bytes, 1)
        if d.phase == "initial":
            if seq == 1 or rng.random() < 0.5:
                b = make_batch(rng, d.id, seq, d.generation, BatchKind.INITIAL, d.key, d.uid.bytes)
                return Input("ps", "record", b.encode(), f"INITIAL batch disk {d.id} seq {seq}", record=(d.id, seq),
                             op="BATCH")
            meta = {"generation": d.generation, "kind": "initial-complete"}
            c = make_marker(rng, d.id, seq, d.generation, meta, d.key, d.uid.bytes)
            return Input("ps", "record", c.encode(), f"MARKER initial-complete disk {d.id} seq {seq}",
                         record=(d.id, seq), op="MARKER", args=meta)
        r = rng.random()
        if r < 0.08:
            seq = rng.choice([seq + 1, seq + 3, max(seq - 1, 1)])
        elif r < 0.09:  # closes the connection (a record for a disk it did not pull): rarely
            other = rng.choice([99999, 0, 2**32 - 1])
            b = make_batch(rng, other, 1, 1)
            return Input("ps", "record", b.encode(), f"BATCH for disk {other}, never pulled", record=(other, 1),
                         op="BATCH")
        if rng.random() < 0.45:
            meta: Any = {"generation": d.generation, "kind": "point", "consistency": "crash-consistent",
                         "time": time.time()}
            if rng.random() < 0.6:
                # Mostly a meta the codec accepts (integer generation, string kind): the hostile value must
                # reach the master target's use of it; a refused one only closes the connection.
                for _ in range(10):
                    cand = mutate_meta(rng, meta)
                    if isinstance(cand, dict) and type(cand.get("generation")) is int and isinstance(
                            cand.get("kind"), str) or rng.random() < 0.1:
                        break
                meta = cand
            text = dumps(meta).encode("utf-8", "surrogatepass")
            try:  # sealed as the agent would seal what the master target will parse: past the seal
                parsed = json.loads(text)
                gen = parsed.get("generation") if isinstance(parsed, dict) else None
                seal = sealer.seal_batch(gen if type(gen) is int and 0 <= gen < 2**32 else 0, seq, meta_bytes(parsed))
            except (ValueError, RecursionError, TypeError, OverflowError):
                seal = os.urandom(28)
            frame = encode_frame(FrameType.MARKER, d.id, seq, len(text).to_bytes(4, "big") + text + seal)
            return Input("ps", "record", frame, f"MARKER disk {d.id} seq {seq} meta {dumps(meta)[:300]}",
                         record=(d.id, seq), op="MARKER", args=meta)
        b = make_batch(rng, d.id, seq, d.generation, BatchKind.DELTA, d.key, d.uid.bytes)
        frame, desc = b.encode(), f"DELTA batch disk {d.id} seq {seq}"
        if rng.random() < 0.15:  # most such tables the codec refuses: the connection closes (1 s to come back)
            payload = mutate_batch_payload(rng, frame[HEADER_SIZE:],
                                           lambda g, t: sealer.seal_batch(g, seq, t))
            frame, desc = fix_frame(frame[:HEADER_SIZE] + payload), desc + " (table edited and sealed again)"
        return Input("ps", "record", frame, desc, record=(d.id, seq), op="BATCH")

    def gen_request(self) -> Input:
        rng = self.rng
        ids = list(self.disks) or [1]
        disk = rng.choice(ids)
        d = self.disks.get(disk)
        paths = [str(self.work / "replicas" / f"new{rng.randrange(100)}.img"), "relative.img", "",
                 str(self.work / "replicas" / ".." / "replicas" / "x.img"), str(self.work / "missing-dir" / "x.img"),
                 d.path if d else "x.img", str(self.work / "replicas")]
        templates: dict[str, dict[str, Any]] = {
            "check_replica": {"path": rng.choice(paths), "format": rng.choice(["raw", "vmdk", "vmdk-sparse", "x"]),
                              "size": rng.choice([DISK_SIZE, 1 << 20]), "existing": rng.random() < 0.3},
            "resync_hashes": {"disk": disk, "generation": 1, "size": d.size if d else DISK_SIZE,
                              "query": rng.choice([{"nonce": "ab", "level": None},
                                                   {"nonce": "ab", "level": 0, "parents": [0]},
                                                   {"nonce": "ab", "level": 1, "parents": [0, 1]}])},
            "points": {"disk": disk},
            "failover": {"disk": disk, "sequence": rng.choice([d.next_seq - 1 if d else 1, 1, 3])},
            "failover_commit": {"disk": disk},
            "test_failover": {"disk": disk, "sequence": d.next_seq - 1 if d else 1,
                              "directory": rng.choice([str(self.work / "tf"), None, "tf", str(self.work / "nope")])},
            "test_failover_cleanup": {"disk": disk},
            "wake": {},
        }
        op = rng.choice(list(templates)) if rng.random() < 0.93 else rng.choice(["", "nope", "subscribe"])
        args: Any = dict(templates.get(op, {}))
        if rng.random() < 0.7:
            args = self.safe_mutate(op, args)
        rid = self.next_id()
        frame = encode_frame(FrameType.REQUEST, 0, 0, dumps({"id": rid, "op": op, "args": args}).encode())
        return Input("ps", "request", frame, f"{op} {dumps(args)[:300]}", rid=rid, op=op, args=args)

    def safe_mutate(self, op: str, args: dict[str, Any]) -> Any:
        """Hostile arguments, except paths outside the test's directory and sizes that would fill the disk
        (a root daemon creates what it is told to). Mostly still an object: arguments that are not one the
        codec refuses, which closes the connection (and costs a reconnect) — tried, but not too often."""
        for _ in range(20):
            cand = mutate_json_value(self.rng, args)
            if self.safe(op, cand) and (isinstance(cand, dict) or self.rng.random() < 0.1):
                return cand
        return args

    def safe(self, op: str, args: Any) -> bool:
        if not isinstance(args, dict):
            return True
        for k in ("path", "directory"):
            v = args.get(k)
            if isinstance(v, str):
                p = os.path.normpath(os.path.join(self.work, v.split("\0")[0]))  # relative: the daemon's cwd
                if p != str(self.work) and not p.startswith(str(self.work) + os.sep):
                    return False
        size = args.get("size")
        if isinstance(size, int) and not isinstance(size, bool):
            if op == "resync_hashes" and (1 << 30) < size < (1 << 45):  # a sparse file that large: hours of hashing
                return False
            if op == "check_replica" and args.get("format") in SMALL_KINDS and size > (64 << 20):
                return False
        return True

    def gen_subscribe(self) -> Any:
        """A function turning the next subscribe answer hostile: a new disk with one bad field, or junk."""
        rng = self.rng
        d = self.new_disk(rng.choice(["raw", "vmdk", "vmdk-sparse"]))
        entry = d.entry()
        del self.disks[d.id]  # listed once, in this answer only
        field_ = rng.choice(["uid", "uid", "size", "replica_format", "replica_path", "wrapped_key", "disk", "seed",
                             "machine", "junk"])
        if field_ == "uid":
            entry["uid"] = rng.choice(["not-a-uuid", "", 5, None, str(d.uid).upper() + "x", [str(d.uid)]])
        elif field_ == "size":
            entry["size"] = rng.choice([-5, 0, 511, "8M", None, 10**400, 2**62, 1.5, [DISK_SIZE]])
        elif field_ == "replica_format":
            entry["replica_format"] = rng.choice(["x", "", None, 3, "device"])
        elif field_ == "replica_path":
            entry["replica_path"] = rng.choice(["", "rel/x.img", None, 7, str(self.work / "replicas"),
                                                str(self.work / "nodir" / "x.img")])
        elif field_ == "wrapped_key":
            entry["wrapped_key"] = rng.choice(["", "!!", base64.b64encode(b"x" * 126).decode(), None, 5])
        elif field_ == "disk":
            entry["disk"] = rng.choice([-1, "7", None, 10**400, 1.5, next(iter(self.disks), 1)])
        elif field_ == "seed":
            entry["seed"] = rng.choice(["yes", [1], {}])
        elif field_ == "machine":
            entry["name"], entry["machine"] = rng.choice([("../x", "../y"), (None, 5), ("", "")])
        else:
            junk = rng.choice([None, [], "x", {"disks": "x"}, {"disks": [1, "a", None]}, {"disks": None},
                               {"disks": [], "cache_dir": 5, "host": ["h"]}])
            return lambda result: junk
        victim = dict(entry)
        return lambda result: {**result, "disks": [*result["disks"], victim]}

    # -- running an input ------------------------------------------------------------------------------------------
    async def wait_session(self, seconds: float = 15.0) -> Session | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            s = self.session
            if s is not None and not s.closed:
                return s
            await asyncio.sleep(0.02)
        return None

    async def run_one(self, inp: Input) -> None:
        self.inputs += 1
        self.problems = []
        s = await self.wait_session()
        if s is None:
            self.problems.append(("mt: did not (re)connect within 15 s", ""))
        else:
            s.history = s.history[-40:] + [inp]
            await self.exchange(s, inp)
        self.check_alive(inp)
        logged = self.log.problems()
        hist = s.history if s is not None else []
        for key, detail in logged or self.problems:
            self.found.add(key, inp, hist, detail)
        if logged and self.problems:
            self.found.note(logged[0][0], "; ".join(k for k, _ in self.problems))

    async def exchange(self, s: Session, inp: Input) -> None:
        if inp.kind == "subscribe-answer":
            self.hostile_subscribe = inp.args
            t0 = time.monotonic()
            # That it comes back for more is checked by check_alive (a subscribe at least every POLL_SECONDS).
            if await self.until(s, lambda: self.last_subscribe > t0 and self.hostile_subscribe is None, 5):
                self.answered += 1
                self.last_hostile = f"{inp.desc}: {self.hostile_desc}"
            return
        if inp.kind == "pull-answer":
            self.answered += 1
            return
        try:
            await asyncio.wait_for(s.link.send_frame(inp.frame), ANSWER_SECONDS)
        except (LinkClosed, ProtocolError, TimeoutError, AttributeError):  # closed or stuck: the oracles see it
            pass
        t0 = time.monotonic()
        if inp.kind == "record":
            disk, seq = inp.record or (0, 0)
            d = self.disks.get(disk)
            gap = d is not None and seq > d.next_seq
            ok = await self.until(s, lambda: (disk, seq) in s.answers or any(
                p == disk and t > t0 for p, t in s.pulls), ANSWER_SECONDS * (3 if gap else 1))
            if ok and (disk, seq) in s.answers:
                a = s.answers.pop((disk, seq))
                if isinstance(a, Ack) and inp.op == "MARKER" and d is not None and inp.args == {
                        "generation": d.generation, "kind": "initial-complete"}:
                    d.phase = "up-to-date"
        elif inp.kind == "request":
            rid = inp.rid
            ok = await self.until(s, lambda: rid in s.replies, ANSWER_SECONDS)
            if ok:
                rep = s.replies.pop(rid)
                if rep.ok and inp.op == "failover" and isinstance(inp.args, dict):
                    d = self.disks.get(inp.args.get("disk"))  # type: ignore[arg-type]
                    if d is not None:
                        d.halted = True
        else:
            rid = self.next_id()
            try:
                await asyncio.wait_for(s.link.send(Request(rid, "wake", {})), ANSWER_SECONDS)
            except (LinkClosed, ProtocolError, TimeoutError, AttributeError):  # closed or stuck: the oracles see it
                pass
            ok = await self.until(s, lambda: rid in s.replies, ANSWER_SECONDS)
        if ok:
            self.answered += 1
            return
        if s.closed:
            self.closed += 1
            if not s.goodbye:
                why: list[str] = []
                for _ in range(40):  # its log line comes with the close, give or take a scheduling delay
                    why = [x for x in self.log.peek().splitlines() if "session ended" in x]
                    if why:
                        break
                    await asyncio.sleep(0.05)
                if why:  # a logged refusal of a bad frame or request: one finding, whatever the input
                    self.problems.append(("mt: closes the connection without a GOODBYE when it refuses a frame "
                                          "(the reason is only logged)", why[-1][-300:]))
                else:
                    self.problems.append((f"{inp.kind}/{inp.op or 'frame'}: the master target closed the "
                                          "connection without a GOODBYE or a logged reason", s.closed))
            return
        what = {"record": "no ACK, REJECT or pull", "request": "no REPLY"}.get(inp.kind, "no answer to a wake")
        self.problems.append((f"{inp.kind}/{inp.op or 'frame'}: {what} and no GOODBYE in "
                              f"{ANSWER_SECONDS:.0f} s", ""))
        if inp.record and inp.record[0] in self.disks:
            self.disks[inp.record[0]].poisoned = "stopped answering"
            self.new_disk()  # keep some disk to send records to

    async def until(self, s: Session, cond: Any, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if cond():
                return True
            if s.closed:
                return bool(cond())
            await asyncio.sleep(0.005)
        return bool(cond())

    def stalled(self, s: Session, what: str) -> None:
        self.problems.append((f"mt: {what}", f"last subscribe {time.monotonic() - self.last_subscribe:.1f} s ago"))
        # Start a fresh session (the master target reconnects): its tasks start again.
        asyncio.get_running_loop().create_task(s.link.close("fuzzer", "starting a fresh session"))

    def check_alive(self, inp: Input) -> None:
        proc = self.dep.procs.get(self.key)
        if proc is not None and proc.poll() is not None:
            self.problems.append(("mt: the master target process exited", f"exit code {proc.returncode}"))
            self.start_mt()
            return
        s = self.session
        now = time.monotonic()
        if s is None or s.closed:
            return
        if now - max(self.last_subscribe, s.started) > POLL_SECONDS:
            self.stalled(s, f"stopped polling: no subscribe for {POLL_SECONDS:.0f} s")
            self.problems[-1] = (self.problems[-1][0], f"last hostile subscribe answer: {self.last_hostile}")
        elif now - max(self.last_report, s.started) > REPORT_SECONDS and self.disks:
            self.problems.append((f"mt: stopped reporting: no mt_report for {REPORT_SECONDS:.0f} s", ""))
            self.last_report = now

    # -- the run ----------------------------------------------------------------------------------------------------
    async def run(self, n: int, seconds: float) -> None:
        server = await asyncio.start_server(self.handle, "127.0.0.1", self.dep.port,
                                            ssl=server_context(self.server_identity), ssl_handshake_timeout=15)
        try:
            for _ in range(3):
                self.new_disk()
            self.start_mt()
            t0 = time.monotonic()
            for _ in range(n):
                if seconds and time.monotonic() - t0 > seconds:
                    break
                await self.run_one(self.gen())
            await self.restart_check()
        finally:
            server.close()
            if self.session is not None:
                await self.session.link.close()

    async def restart_check(self) -> None:
        """Stop the master target (SIGTERM), start it again: it must come back and pull its disks."""
        inp = Input("restart", "check", b"", "SIGTERM, then standby-mt run again")
        self.problems = []
        old, self.session = self.session, None
        await asyncio.to_thread(self.dep.kill, self.key, signal.SIGTERM)  # the loop keeps serving meanwhile
        if old is not None:
            await old.link.close()
        self.start_mt()
        t0 = time.monotonic()
        want = {d.id for d in self.disks.values() if not d.poisoned and not d.halted and d.next_seq > 1}
        s = await self.wait_session(30)
        if s is None:
            self.problems.append(("restart: the master target did not reconnect within 30 s", ""))
        elif not await self.until(s, lambda: want <= {p for p, t in s.pulls if t > t0}, 30):
            missing = want - {p for p, _ in s.pulls}
            self.problems.append(("restart: the master target did not pull its disks again within 30 s",
                                  f"not pulled: {sorted(missing)}"))
        self.check_alive(inp)
        logged = self.log.problems()
        for key, detail in logged or self.problems:
            self.found.add(key, inp, [], detail)


def run_mt_fuzz(root: Path) -> dict[str, Any]:
    fz = MTFuzz(root)
    t0 = time.monotonic()
    fz.setup()
    try:
        asyncio.run(fz.run(MT_INPUTS, MT_SECONDS))
    finally:
        fz.dep.stop_all()
    res = {"name": "mt-sessions (fake process server)", "inputs": fz.inputs, "seconds": time.monotonic() - t0,
           "answered": fz.answered, "closed": fz.closed, "findings": fz.found.summary()}
    engine.SESSION_RESULTS.append(res)
    fz.found.dir.mkdir(parents=True, exist_ok=True)
    (fz.found.dir / "summary.json").write_text(json.dumps(res, indent=2))
    return res
