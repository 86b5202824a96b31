"""In-process targets of what is read back from disk: retention-journal records and files, the redo log,
process-server cache segments, the agent's clean-stop record, the daemons' TOML configs and identities,
the master target's state files and replica descriptors/headers.

Allowed errors, as documented: JournalError (mastertarget/journal_codec.py: "malformed or fails
authentication"), CacheCorrupt (processserver/cache.py), NotStarted for configs (plumbing/errors.py: exit 5,
"bad config"), IdentityError, ReplicaError/OSError for replica files. The clean-stop loader documents that
an unreadable record is a reason, never an exception, so nothing may escape it. The master target's state
files (disks/N.json, failover.json) document no error type: the errors allowed there are the ones its
start-up handles (JournalError, ReplicaError, OSError) — anything else kills the disk's start silently.

Inputs are (file bytes) or (name, file bytes); each run writes them into a fresh directory on tmpfs.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import random
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import tomli_w

from standby.agent import cleanstop
from standby.agent.config import AgentConfig
from standby.mastertarget.config import MTConfig
from standby.mastertarget.diskstate import ReplicaState
from standby.mastertarget.journal import DiskJournal, apply_undo
from standby.mastertarget.journal_codec import (
    REDO_TYPE,
    UNDO_TYPE,
    JournalError,
    decode_group_end,
    decode_undo,
    encode_group_end,
    encode_undo,
    scan,
    undo_opener,
    undo_sealer,
    undo_table,
)
from standby.mastertarget.recovery import FailoverState, RedoLog
from standby.mastertarget.replicas import ReplicaError, create_replica, open_replica
from standby.mastertarget.retention import Policy, plan
from standby.mastertarget.segments import Group, walk_records
from standby.plumbing import identity as ident
from standby.plumbing.errors import NotStarted
from standby.processserver.cache import CacheCorrupt, DiskCache
from standby.processserver.deployment import PSConfig
from standby.proto.envelope import REDO
from standby.proto.frames import HEADER_SIZE, scan_records
from standby.proto.point import Point

from .corpus import KEY, UID, make_batch, make_marker
from .engine import PropertyViolation, Target
from .formats import mutate_undo_payload
from .mutators import dumps, mutate_bytes, mutate_frame, mutate_json_text, mutate_json_value
from .wire_targets import mutate_segment

_shm = Path("/dev/shm")
WORK = Path(tempfile.mkdtemp(prefix="standby-fuzz-", dir=_shm if _shm.is_dir() and os.access(_shm, os.W_OK) else None))
atexit.register(shutil.rmtree, WORK, True)

UNDO_SEALER = undo_sealer(KEY, UID.bytes)
UNDO_OPENER = undo_opener(KEY, UID.bytes)
REDO_SEALER = undo_sealer(KEY, UID.bytes, 1, REDO)


def fresh(name: str) -> Path:
    d = WORK / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _undo_reseal(sequence: int, sealer: Any = UNDO_SEALER):  # noqa: ANN202
    return lambda generation, table: sealer.seal_batch(generation, sequence, table)


def journal_payload_mutator(rng: random.Random, ftype: int, payload: bytes, sequence: int = 1) -> bytes:
    if ftype == UNDO_TYPE:
        return mutate_undo_payload(rng, payload, _undo_reseal(sequence))
    if ftype == REDO_TYPE:
        return mutate_undo_payload(rng, payload, _undo_reseal(sequence, REDO_SEALER))
    return mutate_json_text(rng, payload) if rng.random() < 0.3 else _mutate_meta_text(rng, payload)


def _mutate_meta_text(rng: random.Random, payload: bytes) -> bytes:
    from .formats import mutate_meta

    try:
        import json

        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return mutate_bytes(rng, payload)
    return dumps(mutate_meta(rng, doc) if isinstance(doc, dict) else mutate_json_value(rng, doc)).encode()


def _mutate_journal_file(rng: random.Random, seg: bytes, others: list[bytes]) -> bytes:
    """Damage (a torn tail, flipped bits) or one record edited with checksums — and table seals — recomputed."""
    recs, _, _ = scan_records(seg)
    r = rng.random()
    if not recs or r < 0.2:
        return mutate_bytes(rng, seg, others)
    if r < 0.3:
        return seg[: rng.randrange(len(seg))]  # torn anywhere
    rec = rng.choice(recs)
    old = bytes(seg[rec.offset : rec.end])
    seq = rec.header.sequence
    new = mutate_frame(rng, old, [], lambda g, t, p: journal_payload_mutator(g, t, p, seq))
    return seg[: rec.offset] + new + seg[rec.end :]


# ---- journal records (pure) ----------------------------------------------------------------------------------------


def _pieces(rng: random.Random) -> list[tuple[int, bytes]]:
    out, off = [], 0
    for _ in range(rng.randint(1, 3)):
        n = rng.choice([512, 4096, 65536])
        out.append((off, rng.choice([bytes(n), rng.randbytes(n), b"y" * n])))
        off += n + 4096
    return out


def _undo_seeds(rng: random.Random) -> list[tuple[int, bytes]]:
    out = []
    for seq in range(1, 9):
        rec = encode_undo(1, seq, 1 + seq % 2, _pieces(rng), UNDO_SEALER)
        out.append((seq, rec[HEADER_SIZE:]))
    return out


def _undo_mutate(rng: random.Random, seed: tuple[int, bytes], seeds: list[Any]) -> tuple[int, bytes]:
    seq, payload = seed
    if rng.random() < 0.2:
        return seq, mutate_bytes(rng, payload)
    return seq, mutate_undo_payload(rng, payload, _undo_reseal(seq))


def _undo_run(inp: tuple[int, bytes]) -> None:
    seq, payload = inp
    rec = decode_undo(1, seq, payload, UNDO_OPENER)
    for (off, data), n in zip(rec.extents, rec.lengths, strict=True):
        if data is not None and len(data) != n:
            raise PropertyViolation(f"undo extent at {off}: {len(data)} bytes for length {n}")
    table = undo_table(seq, payload, UNDO_OPENER)
    if not isinstance(table, list) or len(table) != len(rec.lengths):
        raise PropertyViolation("undo_table disagrees with decode_undo")


def _undo_table_mutate(rng: random.Random, seed: tuple[int, bytes], seeds: list[Any]) -> tuple[int, bytes]:
    seq, payload = _undo_mutate(rng, seed, seeds)
    return seq, payload[: rng.choice([len(payload), rng.randrange(len(payload) + 1), 8, 36])]


def _undo_table_run(inp: tuple[int, bytes]) -> None:
    seq, prefix = inp
    got = undo_table(seq, prefix, UNDO_OPENER)
    if isinstance(got, int) and got <= len(prefix):
        raise PropertyViolation(f"undo_table asks for {got} bytes having {len(prefix)}: its caller would loop")


def _group_end_seeds(rng: random.Random) -> list[bytes]:
    metas = [{"kind": "point", "consistency": "crash-consistent", "tag": "t"},
             {"kind": "point", "consistency": "app-consistent", "tag": "t", "freeze_seconds": 0.01},
             {"kind": "batch"}, {"kind": "initial-complete"}]
    return [encode_group_end(1, s, {"generation": 1, "time": time.time(), "first": s, **m})[HEADER_SIZE:]
            for s, m in enumerate(metas, 1)]


def _group_end_run(payload: bytes) -> None:
    """decode_group_end, then what start-up and `points` read from the record: its group's time, consistency
    and kind, and the point the state file keeps (a group end that decodes names its point, if it is one)."""
    c = decode_group_end(1, 5, payload)
    g = Group(c.sequence, c.sequence, c.meta, Path("seg"))
    _ = g.is_point, g.time, g.consistency
    if g.is_point:
        Point.from_group(g).to_wire()


# ---- journal files -------------------------------------------------------------------------------------------------


@cache
def _journal_files() -> tuple[bytes, ...]:
    """Real segments: groups with undo and end records, points of both kinds, a pending undo at the end."""
    rng = random.Random(3)
    out = []
    for variant in range(3):
        d = fresh(f"journal-seed-{variant}")
        j = DiskJournal(d, 1, KEY, UID.bytes)
        j.open()
        seq = 1
        for g in range(4):
            first = seq
            if g % 2 == 0:
                j.write_undo(first, 1, _pieces(rng))
            seq += rng.randint(0, 2)
            j.end_group(first, seq, {"generation": 1, "kind": "point" if g != 1 else "batch",
                                        "consistency": "app-consistent" if g == 2 else "crash-consistent",
                                        "time": time.time() - 100 + g, "tag": ""})
            seq += 1
        if variant == 1:
            j.write_undo(seq, 1, _pieces(rng))
        j.close()
        out += [p.read_bytes() for p in sorted(d.glob("seg-*.jrn"))]
    return tuple(out)


def _journal_open_run(seg: bytes) -> None:
    """Start-up of a disk's history, as the master target does it: open (rolling a pending undo back into a
    fake replica), then what upkeep and `points` compute from it."""
    d = fresh("journal")
    (d / "seg-00000000000000000001.jrn").write_bytes(seg)
    j = DiskJournal(d, 1, KEY, UID.bytes)
    try:
        pending = j.open()
        if pending is not None:
            apply_undo(pending.record, lambda off, data, n: None)
        plan(j.retention_points(), time.time(), Policy())
        j.history_bytes()
        for g in j.points():
            Point.from_group(g).to_wire()
        for g in list(j.groups)[:3]:
            j.undo_ranges(g)
            j.read_undo(g)
    finally:
        j.close()


def _walk_run(seg: bytes) -> None:
    d = fresh("walk")
    p = d / "seg.jrn"
    p.write_bytes(seg)
    w = walk_records(p)
    pos = 0
    for _, _, _, at, size, _ in w.records:
        if at != pos:
            raise PropertyViolation("walk_records skipped bytes")
        pos = at + size
    if w.good_end != pos:
        raise PropertyViolation("walk_records good_end is not the end of its last record")


@cache
def _redo_files() -> tuple[bytes, ...]:
    rng = random.Random(4)
    out = []
    for v in range(2):
        d = fresh(f"redo-seed-{v}")
        j = DiskJournal(d, 1, KEY, UID.bytes)
        rl = RedoLog(j)
        disk = bytearray(rng.randbytes(1 << 18))
        for step in range(2 + v):
            rl.push(10 - step, 8 - step, [[(0, 4096), (8192, 512)], [(65536, 4096)]],
                    lambda a, n, disk=disk: bytes(disk[a : a + n]))
        out.append(rl.path.read_bytes())
    return tuple(out)


def _redo_run(data: bytes) -> None:
    d = fresh("redo")
    (d / "redo.jrn").write_bytes(data)
    j = DiskJournal(d, 1, KEY, UID.bytes)
    rl = RedoLog(j)
    for m in rl.moves:
        for rec in rl.read(m):
            apply_undo(rec, lambda off, data, n: None)
    rl.drop_incomplete()


# ---- process-server cache -------------------------------------------------------------------------------------------


@cache
def _cache_files() -> tuple[bytes, ...]:
    rng = random.Random(5)
    out = []
    for v in range(3):
        d = fresh(f"cache-seed-{v}")
        c = DiskCache(d)
        c.recover()
        seq = 1
        for _ in range(5):
            if rng.random() < 0.6:
                m: Any = make_batch(rng, 1, seq, 1)
            else:
                m = make_marker(rng, 1, seq, 1)
            c.append(seq, m.encode())
            seq += 1
        c.close()
        out += [p.read_bytes() for p in sorted(d.glob("seg-*.log"))]
    return tuple(out)


def _cache_run(seg: bytes) -> None:
    d = fresh("cache")
    (d / "seg-00000000000000000001.log").write_bytes(seg)
    c = DiskCache(d)
    try:
        rec = c.recover()
        seqs = [e.sequence for e in c.index]
        if seqs != sorted(set(seqs)) or (seqs and rec.last_seq != seqs[-1]):
            raise PropertyViolation(f"recovered index out of order or disagreeing with last_seq: {seqs[:8]}...")
    finally:
        c.close()


def _cache_mutate(rng: random.Random, seg: bytes, seeds: list[bytes]) -> bytes:
    return mutate_segment(rng, seg, seeds, _cache_payload)


def _cache_payload(rng: random.Random, ftype: int, payload: bytes) -> bytes:
    from .wire_targets import payload_mutator

    return payload_mutator(rng, ftype, payload)


# ---- the agent's clean-stop record ----------------------------------------------------------------------------------

_IMAGE = "/var/lib/images/disk0.img"
_SIZE = 1 << 30


def _cleanstop_seeds(rng: random.Random) -> list[bytes]:
    d = fresh("cleanstop-seed")
    out = []
    for ext in ([], [[0, 4096]], [[0, 4096], [1 << 20, 65536], [_SIZE - 512, 512]]):
        cleanstop.save(d, "sda", _IMAGE, _SIZE, [1, 2, 3, 4], ext)  # type: ignore[arg-type]
        out.append((d / "sda.clean-stop.json").read_bytes())
    return out


def _cleanstop_run(data: bytes) -> None:
    d = fresh("cleanstop")
    (d / "sda.clean-stop.json").write_bytes(data)
    real = cleanstop.write_counters
    cleanstop.write_counters = lambda path: [1, 2, 3, 4]  # the record's counters: reach the extents parser
    try:
        extents, reason = cleanstop.load(d, "sda", _IMAGE, _SIZE)
    finally:
        cleanstop.write_counters = real
    for a, n in extents:
        if not (isinstance(a, int) and isinstance(n, int) and 0 <= a and 0 < n and a + n <= _SIZE):
            raise PropertyViolation(f"clean-stop record carried extent ({a!r}, {n!r}) outside the disk")


def _json_mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    return mutate_json_text(rng, seed) if rng.random() < 0.85 else mutate_bytes(rng, seed, seeds)


# ---- configs and identities -----------------------------------------------------------------------------------------

_TOML_HOSTILE: list[Any] = [
    math.inf, -math.inf, math.nan, 2**63 - 1, -(2**63), 0, -1, 1.5, "", "x" * 5000, "../../x", "inf", "1e400",
    "9" * 5000, "99999999999999999999G", "-5M", "1.5.5", True, [], [1, 2], [[1]], {"a": 1}, {},
    datetime.datetime(2024, 1, 1), datetime.date(2024, 1, 1), datetime.time(1, 2), "127.0.0.1:99999", "[::1]:0",
    "host:port", "a:b:c", [[3600, 0], [60]], [["1h", "x"]], [[-1, 0]], [[math.inf, math.nan]],
]


def _config_seeds(rng: random.Random) -> list[tuple[str, bytes]]:
    agent = {"name": "web01", "server": "ps.example.net:9443", "compression_level": 1, "batch_size": "8M",
             "tracker": "auto", "cut_interval": 1.0, "cut_bytes": "64M", "trace_buffer": "16M",
             "pre_script": "/etc/standby/pre", "script_timeout": 60, "freeze_timeout": 10,
             "app_consistent_every": 3600, "disks": [{"name": "sda", "path": "/dev/sda"}]}
    mt = {"name": "mt01", "server": "127.0.0.1:9443",
          "retention": {"dir": "/mnt/retention", "window": "24h", "space_cap": "200G",
                        "tiers": [[3600, 0], [21600, 300], [86400, 3600]], "segment_size": "64M", "reserve": "64M"}}
    ps = {"name": "ps", "listen": "0.0.0.0", "port": 9443, "cache_dir": "/var/lib/standby/ps/cache",
          "cache_quota": "10G", "rpo_threshold": 900.0}
    return [("agent", tomli_w.dumps(agent).encode()), ("mt", tomli_w.dumps(mt).encode()),
            ("ps", tomli_w.dumps(ps).encode())]


def _mutate_toml_doc(rng: random.Random, doc: Any, depth: int = 0) -> Any:
    if isinstance(doc, dict) and doc and depth < 4:
        doc = dict(doc)
        k = rng.choice(list(doc))
        r = rng.random()
        if r < 0.7:
            doc[k] = _mutate_toml_doc(rng, doc[k], depth + 1)
        elif r < 0.85:
            del doc[k]
        else:
            doc[rng.choice(["retention", "disks", "port", "server", "name", "x"])] = rng.choice(_TOML_HOSTILE)
        return doc
    if isinstance(doc, list) and doc and rng.random() < 0.6 and depth < 4:
        doc = list(doc)
        i = rng.randrange(len(doc))
        doc[i] = _mutate_toml_doc(rng, doc[i], depth + 1)
        return doc
    return rng.choice(_TOML_HOSTILE)


def _config_mutate(rng: random.Random, seed: tuple[str, bytes], seeds: list[Any]) -> tuple[str, bytes]:
    import tomllib

    kind, text = seed
    if rng.random() < 0.2:
        return kind, mutate_bytes(rng, text)
    doc = tomllib.loads(text.decode())
    for _ in range(rng.choice([1, 1, 2])):
        doc = _mutate_toml_doc(rng, doc)
    try:
        return kind, tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):
        return kind, text


def _config_run(inp: tuple[str, bytes]) -> None:
    kind, text = inp
    d = fresh("config")
    (d / f"{kind}.toml").write_bytes(text)
    {"agent": AgentConfig.load, "mt": MTConfig.load, "ps": PSConfig.load}[kind](d)


@cache
def _identity_files() -> tuple[tuple[str, bytes], ...]:
    ca, ca_key = ident.create_ca("fuzz")
    key, csr = ident.make_key_and_csr("web01", "agent")
    cert = ident.sign_csr(ca, ca_key, csr, "web01", "agent")
    return (("cert.pem", cert), ("key.pem", key), ("ca.pem", ca))


def _identity_seeds(rng: random.Random) -> list[tuple[str, bytes]]:
    return list(_identity_files())


def _identity_mutate(rng: random.Random, seed: tuple[str, bytes], seeds: list[Any]) -> tuple[str, bytes]:
    import base64

    name, pem = seed
    r = rng.random()
    if r < 0.4:
        return name, mutate_bytes(rng, pem)
    if r < 0.8:  # damage inside the base64 body: the DER parser sees it
        lines = pem.splitlines()
        body = base64.b64decode(b"".join(lines[1:-1]))
        body = mutate_bytes(rng, body)
        b64 = base64.encodebytes(body).replace(b"\n", b"")
        return name, lines[0] + b"\n" + b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64)) + b"\n" + lines[-1]
    return name, rng.choice([b"", dict(_identity_files())["key.pem"], dict(_identity_files())["cert.pem"] * 2])


def _identity_run(inp: tuple[str, bytes]) -> None:
    name, pem = inp
    d = fresh("identity")
    for n, data in _identity_files():
        (d / n).write_bytes(pem if n == name else data)
    ident.Identity.load(d)


# ---- master-target state files and replicas -------------------------------------------------------------------------


def _state_seeds(rng: random.Random) -> list[tuple[str, bytes]]:
    d = fresh("state-seed")
    st = ReplicaState(3, "web01", "sda", str(UID), 1 << 30, "vmdk", "/srv/replicas/web01-sda.vmdk", 17, 2,
                      "UpToDate", None, {"sequence": 17, "generation": 2, "time": time.time(),
                                         "consistency": "crash-consistent"})
    st.save(d)
    FailoverState(20, 17, 17, time.time(), time.time(), False, {"op": 0, "src": 20, "dst": 17}).save(d)
    return [("disk", (d / "3.json").read_bytes()), ("failover", (d / "failover.json").read_bytes())]


def _state_mutate(rng: random.Random, seed: tuple[str, bytes], seeds: list[Any]) -> tuple[str, bytes]:
    kind, text = seed
    return kind, _json_mutate(rng, text, [])


def _state_run(inp: tuple[str, bytes]) -> None:
    kind, text = inp
    d = fresh("state")
    if kind == "disk":
        (d / "3.json").write_bytes(text)
        st = ReplicaState.load(d, 3)
        assert st is not None
        ReplicaState.all(d)
    else:
        (d / "failover.json").write_bytes(text)
        FailoverState.load(d)


_REPLICA_SIZE = 1 << 20


@cache
def _replica_files() -> tuple[tuple[str, str, bytes], ...]:
    out = []
    for kind in ("vmdk", "vmdk-monolithic-flat", "vmdk-sparse"):
        d = fresh(f"replica-seed-{kind}")
        r = create_replica(kind, d / "r.vmdk", _REPLICA_SIZE)
        r.write(0, b"\x01" * 4096)
        r.sync()
        r.close()
        out.append((kind, "r.vmdk", (d / "r.vmdk").read_bytes()))
    return tuple(out)


def _replica_seeds(rng: random.Random) -> list[tuple[str, str, bytes]]:
    return list(_replica_files())


def _replica_mutate(rng: random.Random, seed: tuple[str, str, bytes], seeds: list[Any]) -> tuple[str, str, bytes]:
    kind, name, data = seed
    if kind != "vmdk-sparse" and rng.random() < 0.7:  # descriptor lines: numbers, names, create types
        lines = data.decode("latin-1").splitlines()
        i = rng.randrange(len(lines))
        line = lines[i]
        r = rng.random()
        if r < 0.5:
            import re

            nums = list(re.finditer(r"\d+", line))
            if nums:
                m = rng.choice(nums)
                line = line[: m.start()] + str(rng.choice([0, 1, 2**32, 2**64, 10**30, "9" * 5000, -1]))
                line += data.decode("latin-1").splitlines()[i][m.end() :]
        elif r < 0.7:
            line = line.replace('"', rng.choice(['"x', "", '""', '"\0']), 1)
        elif r < 0.85:
            line = rng.choice(['createType="streamOptimized"', "version=9", 'RW 99999999999999 FLAT "r-flat.vmdk" 0',
                               'RW 2048 SPARSE "r-flat.vmdk"', "RW 2048 FLAT", "=", "a b c", "ddb.x = ", "CID=zz"])
        else:
            lines.insert(i, line)
        lines[i] = line
        return kind, name, "\n".join(lines).encode("latin-1")
    if kind == "vmdk-sparse" and rng.random() < 0.6:  # header fields (first sector) and metadata
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            pos = rng.choice([8, 12, 20, 28, 36, 44, 48, 56, 64, 72, 73, 74, 77, rng.randrange(min(len(b), 4096))])
            width = rng.choice([1, 4, 8])
            b[pos : pos + width] = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 512, 8, 3]).to_bytes(8, "little")[:width]
        return kind, name, bytes(b)
    return kind, name, mutate_bytes(rng, data)


def _replica_run(inp: tuple[str, str, bytes]) -> None:
    kind, name, data = inp
    d = fresh("replica")
    seed_dir = WORK / f"replica-seed-{kind}"
    for f in seed_dir.iterdir():  # the flat extent as created (sparse), then the mutated descriptor/image
        if f.name != name:
            shutil.copyfile(f, d / f.name)
    (d / name).write_bytes(data)
    r = open_replica(kind, d / name, _REPLICA_SIZE)
    try:
        for f in r.data_files():
            if d.resolve() not in Path(f).resolve().parents:
                raise PropertyViolation(f"a replica descriptor in {d} made the master target open {f}")
        r.read(0, 4096)
        r.read(_REPLICA_SIZE - 4096, 4096)
    finally:
        r.close()


# ---- the list -------------------------------------------------------------------------------------------------------

def _journal_seeds(rng: random.Random) -> list[bytes]:
    return list(_journal_files())


def _scan_run(seg: bytes) -> None:
    scan(seg)


def _group_end_mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    return _mutate_meta_text(rng, seed) if rng.random() < 0.7 else mutate_json_text(rng, seed)


TARGETS = [
    Target("journal.decode_undo", _undo_seeds, _undo_mutate, _undo_run, (JournalError,), ci_inputs=20_000,
           weight=0.5),
    Target("journal.undo_table", _undo_seeds, _undo_table_mutate, _undo_table_run, (JournalError,),
           ci_inputs=20_000, weight=0.3),
    Target("journal.decode_group_end+group", _group_end_seeds, _group_end_mutate, _group_end_run, (JournalError,),
           ci_inputs=6_000, weight=0.5),
    Target("journal.scan", _journal_seeds, _mutate_journal_file, _scan_run, (), ci_inputs=10_000, weight=0.3),
    Target("history.walk_records", _journal_seeds, _mutate_journal_file, _walk_run, (), ci_inputs=6_000,
           weight=0.3),
    Target("history.DiskJournal.open", _journal_seeds, _mutate_journal_file, _journal_open_run, (JournalError,),
           ci_inputs=4_000, weight=1.0),
    Target("recovery.RedoLog", lambda rng: list(_redo_files()), _mutate_journal_file, _redo_run, (JournalError,),
           ci_inputs=3_000, weight=0.5),
    Target("cache.DiskCache.recover", lambda rng: list(_cache_files()), _cache_mutate, _cache_run,
           (CacheCorrupt,), ci_inputs=4_000, weight=1.0),
    Target("cleanstop.load", _cleanstop_seeds, _json_mutate, _cleanstop_run, (), ci_inputs=5_000, weight=0.5),
    Target("config.load(agent,mt,ps)", _config_seeds, _config_mutate, _config_run, (NotStarted,),
           ci_inputs=6_000, weight=0.5),
    Target("identity.Identity.load", _identity_seeds, _identity_mutate, _identity_run, (ident.IdentityError,),
           ci_inputs=3_000, weight=0.1),
    Target("mt.state_files", _state_seeds, _state_mutate, _state_run, (JournalError, ReplicaError, OSError),
           ci_inputs=4_000, weight=0.3),
    Target("replicas.open_replica", _replica_seeds, _replica_mutate, _replica_run, (ReplicaError, OSError),
           ci_inputs=3_000, weight=0.3),
]
