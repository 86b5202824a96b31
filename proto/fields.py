"""Checks of the single values in control requests and replies, and `Wire`, the base of every typed
request and reply (proto.requests): a frozen, slotted dataclass validated in its constructor.

Bounds, and why
---------------
==================  =========================================  ================================================
value               accepted                                   why this bound
==================  =========================================  ================================================
disk id             int 1 .. 2**32-1                           the frame header's stream field is u32; 0 = none
sequence, cursor,   int 0 .. 2**63-1                           the registry is SQLite: INTEGER is signed 64-bit
counters, bytes
generation          int 0 .. 2**32-1                           batch header and AEAD associated data pack u32
disk size           int, multiple of 512, 1 .. 2**50 (1 PiB)   sectors; VMDK stops at 62 TB, so 1 PiB is ample
time                int or float, finite, years 2000 .. 2200  wall-clock stamps; json turns 1e400 into inf and
                                                               keeps 10**400 an int: float() of it overflows
duration            finite, 0 .. 10**9 s                       31 years: a duration beyond is a bug or an attack
name                [A-Za-z0-9][A-Za-z0-9._-]{0,62}            machine and disk names become file names, log
                                                               words and SQLite keys: never '.', '..' or '/'
uuid                canonical lower-case 8-4-4-4-12 text       the retention directory is named after it
path                absolute, no '..' segment, no control      a replica or device path on a peer; '..' would
                    character, at most 4095 bytes (PATH_MAX)   slip past the "not on the retention volume" check
tag                 printable, at most 200 characters          agent.appoint.MAX_TAG
text (reasons...)   no NUL, at most 4096 characters            shown in status and logs
lists, maps         at most MAX_ITEMS entries (plus specific   the 1 MiB control frame bounds them anyway; the
                    caps: 512 hash parents, 1024 replicas)     cap bounds the work for in-process values too
==================  =========================================  ================================================
"""


from __future__ import annotations

import base64
import binascii
import math
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError
from .frames import MAX_CONTROL_PAYLOAD

# ---- bounds (see the table above) --------------------------------------------------------------------

SECTOR = 512
MAX_DISK_ID = 2**32 - 1
MAX_SEQUENCE = 2**63 - 1
MAX_COUNT = 2**63 - 1
MAX_GENERATION = 2**32 - 1
MAX_DISK_SIZE = 2**50
TIME_MIN = 946_684_800.0  # 2000-01-01T00:00:00Z
TIME_MAX = 7_258_118_400.0  # 2200-01-01T00:00:00Z
MAX_SECONDS = 10**9
MAX_TAG = 200  # agent.appoint.MAX_TAG
MAX_TEXT = 4096
MAX_SHORT = 255  # host names, tracker names, point choices
MAX_PATH = 4095  # Linux PATH_MAX (4096) less the NUL
MAX_PEM = 64 * 1024  # a certificate or CSR is ~1 KiB; a chain of a few is still far below
MAX_PASSPHRASE = 1024
MAX_WRAPPED_KEY = 1024  # proto.keywrap.WRAPPED_BYTES is 126 today; room for a later wrap version
MAX_SEALED_HASHES = MAX_CONTROL_PAYLOAD  # an answer to a resync hash query fits in one control frame
# Parents per resync hash query (agent.resync.PARENTS_PER_QUERY): FAN = 64 children of 16 bytes each, base64 in
# a JSON reply, must stay under the 1 MiB control frame.
MAX_HASH_PARENTS = 512
MAX_HASH_LEVEL = 16  # 4 KiB leaves, fan 64: level 7 already covers 2**50 bytes
MAX_HASH_NODE = 2**40  # node indexes: 2**50 / 4 KiB = 2**38 leaves
MAX_REPLICAS = 1024  # --replica DISK=PATH options of one protect
MAX_ITEMS = 100_000
MAX_JSON_DEPTH = 8  # free-form parts of status replies

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TOKEN_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")  # a state word: up-to-date, failed-over, running...
DISK_KEY_RE = re.compile(r"[1-9][0-9]{0,9}")  # a disk id as a JSON object key (mt_report)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads makes lone surrogates; they cannot be encoded

ROLES = ("agent", "mt", "admin", "ps", "enroll")  # proto.messages.ROLES
ENROLL_ROLES = ("agent", "mt")
# processserver.admin.FORMATS == mastertarget.replicas.KINDS (a test holds all three equal)
REPLICA_FORMATS = ("vmdk", "vmdk-thick", "vmdk-monolithic-flat", "vmdk-sparse", "raw", "device")
RESYNC_MODES = ("checksum", "full")
RESYNC_PHASES = ("waiting", "hashing", "comparing", "shipping", "complete")  # agent.resync.Progress.phase
COMMIT_KINDS = ("initial-complete", "resync-complete", "point", "batch")  # "batch": the journal's own
CONSISTENCIES = ("crash-consistent", "app-consistent")


# ---- errors ------------------------------------------------------------------------------------------


def _path_text(path: tuple[str, ...]) -> str:
    out = ""
    for p in path:
        out += p if p.startswith("[") or not out else "." + p
    return out


class InvalidMessage(LocalProtocolError):
    """We tried to build a request or reply with an invalid value (a bug on our side)."""

    def __init__(self, what: str, path: tuple[str, ...], problem: str) -> None:
        where = _path_text(path)
        super().__init__("bad-input", f"{what}: {where} {problem}" if where else f"{what}: {problem}")
        self.what, self.path, self.problem = what, path, problem


class BadRequest(RemoteProtocolError):
    """A peer sent an invalid request (code `bad-input`), an unknown one (`unknown-request`), one its role
    may not send (`forbidden`), an invalid reply (`bad-reply`) or an invalid COMMIT meta (`bad-commit`).
    `str(exc)` names the op, the field and what was wrong: it is what the peer is told."""


class _Invalid(Exception):
    """Internal: a field check failed. `path` leads from the field to the bad value."""

    def __init__(self, problem: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(problem)
        self.problem, self.path = problem, path


def _show(v: object) -> str:
    """A short, safe rendering of a peer's value for an error message (never the whole of a huge one)."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        # repr() of a huge int is slow, and refused beyond 4300 digits.
        return repr(v) if v.bit_length() <= 128 else f"an integer of about {int(v.bit_length() * 0.30103) + 1} digits"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 60 else f"{v[:40]!r}... ({len(v)} characters)"
    if isinstance(v, list | tuple):
        return f"a list of {len(v)} items"
    if isinstance(v, dict):
        return f"an object of {len(v)} keys"
    return f"a {type(v).__name__}"


# ---- field checks: value -> value (possibly normalised: lists become tuples), or _Invalid ---------------

Check = Callable[[Any], Any]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_range(lo: int, hi: int, what: str) -> Check:
    def check(v: Any) -> int:
        if not _is_int(v) or not lo <= v <= hi:
            raise _Invalid(f"must be {what}, got {_show(v)}")
        return v

    return check


def _number_range(lo: float, hi: float, what: str) -> Check:
    """int or float (kept as given: a COMMIT's seal covers its JSON, so 5 must not become 5.0)."""

    def check(v: Any) -> int | float:
        # NaN compares false and the bounds are finite, so nan and +-inf fail the range test too.
        if not (_is_int(v) or isinstance(v, float)) or not lo <= v <= hi:
            raise _Invalid(f"must be {what}, got {_show(v)}")
        return v

    return check


disk_id = _int_range(1, MAX_DISK_ID, f"a disk id (an integer 1..{MAX_DISK_ID})")
sequence = _int_range(0, MAX_SEQUENCE, "a sequence number (an integer 0..2**63-1)")
generation = _int_range(0, MAX_GENERATION, "a generation (an integer 0..2**32-1)")
count = _int_range(0, MAX_COUNT, "a count (an integer 0..2**63-1)")
hash_level = _int_range(0, MAX_HASH_LEVEL, f"a checksum tree level (an integer 0..{MAX_HASH_LEVEL})")
hash_node = _int_range(0, MAX_HASH_NODE, "a checksum tree node index (an integer 0..2**40)")
step_op = _int_range(0, 1, "0 (undo) or 1 (redo)")
time_ = _number_range(TIME_MIN, TIME_MAX, "a time in seconds since the epoch, between the years 2000 and 2200")
seconds = _number_range(0, MAX_SECONDS, f"a duration in seconds (a finite number 0..{MAX_SECONDS})")
# A wall-clock difference (agent.resync.Progress.elapsed) is negative after a clock step: say so, do not refuse.
span = _number_range(-MAX_SECONDS, MAX_SECONDS, "a finite number of seconds")
# Estimates (an ETA) may be huge, never infinite; an int beyond the largest float would overflow float().
nonnegative = _number_range(0, sys.float_info.max, "a finite number >= 0")
fraction = _number_range(0, 1, "a fraction between 0 and 1")


def size(v: Any) -> int:
    if not _is_int(v) or not 0 < v <= MAX_DISK_SIZE or v % SECTOR:
        raise _Invalid(f"must be a positive multiple of 512 bytes (at most 1 PiB), got {_show(v)}")
    return v


def stored_time(v: Any) -> int | float:
    """A time the master target keeps in its own state files, where 0 means "not set yet"."""
    if v == 0 and not isinstance(v, bool):
        return v
    return time_(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"must be true or false, got {_show(v)}")
    return v


def name(v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise _Invalid(
            f"must be a name of 1..63 letters, digits, '.', '_' or '-' starting with a letter or digit, got {_show(v)}"
        )
    return v


def token(v: Any) -> str:
    if not isinstance(v, str) or not TOKEN_RE.fullmatch(v):
        raise _Invalid(f"must be a lower-case word (a-z, 0-9, '-'), got {_show(v)}")
    return v


def uuid_text(v: Any) -> str:
    if isinstance(v, str) and len(v) == 36:
        try:
            if str(uuid.UUID(v)) == v:
                return v
        except ValueError:
            pass
    raise _Invalid(f"must be a UUID in canonical form (8-4-4-4-12 lower-case hex digits), got {_show(v)}")


def path(v: Any) -> str:
    ok = (
        isinstance(v, str)
        and v.startswith("/")
        and len(v) <= MAX_PATH
        and not _CONTROL.search(v)
        and not _SURROGATE.search(v)
        and ".." not in v.split("/")
        and len(v.encode()) <= MAX_PATH
    )
    if not ok:
        raise _Invalid(
            f"must be an absolute path without '..' segments or control characters (at most {MAX_PATH} bytes), "
            f"got {_show(v)}"
        )
    return v


def _text_check(limit: int, printable: bool, what: str) -> Check:
    def check(v: Any) -> str:
        ok = isinstance(v, str) and len(v) <= limit and not _SURROGATE.search(v)
        if ok and (v.isprintable() if printable else "\x00" not in v):
            return v
        raise _Invalid(f"must be {what}, got {_show(v)}")

    return check


tag = _text_check(MAX_TAG, True, f"printable text of at most {MAX_TAG} characters")
text = _text_check(MAX_TEXT, False, f"text of at most {MAX_TEXT} characters without NUL")
short_text = _text_check(MAX_SHORT, True, f"printable text of at most {MAX_SHORT} characters")
passphrase = _text_check(MAX_PASSPHRASE, False, f"text of at most {MAX_PASSPHRASE} characters without NUL")


def point_choice(v: Any) -> str:
    """--point: latest, latest-processed, latest-app, SEQ or DISK:SEQ; the process server's `choose` says
    which of those exist. Here only its shape is bounded."""
    if not isinstance(v, str) or not v or len(v) > MAX_SHORT or not v.isprintable():
        raise _Invalid(f"must be a point (latest, latest-processed, latest-app, SEQ or DISK:SEQ), got {_show(v)}")
    return v


def pem(v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_PEM or not v.startswith("-----BEGIN ") or not v.isascii():
        raise _Invalid(f"must be PEM text (-----BEGIN ...) of at most {MAX_PEM} bytes, got {_show(v)}")
    return v


def base64_bytes(lo: int, hi: int, what: str) -> Check:
    """Strict base64 text (nothing ignored) whose decoded length is lo..hi bytes; kept as text."""

    def check(v: Any) -> str:
        if isinstance(v, str) and len(v) <= 4 * (hi + 2) // 3:
            try:
                raw = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raw = None
            if raw is not None and lo <= len(raw) <= hi:
                return v
        raise _Invalid(f"must be {what} ({lo}..{hi} bytes, base64), got {_show(v)}")

    return check


wrapped_key = base64_bytes(1, MAX_WRAPPED_KEY, "a wrapped data key")
sealed_hashes = base64_bytes(28, MAX_SEALED_HASHES, "sealed hashes")  # nonce 12 + GCM tag 16 at least
hash_nonce = base64_bytes(8, 64, "a query nonce")


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {_show(v)}")
        return v

    return check


replica_format = one_of(*REPLICA_FORMATS)
resync_mode = one_of(*RESYNC_MODES)
consistency = one_of(*CONSISTENCIES)


def optional(check: Check) -> Check:
    def opt(v: Any) -> Any:
        return None if v is None else check(v)

    return opt


def list_of(check: Check, max_items: int = MAX_ITEMS, min_items: int = 0) -> Check:
    def check_list(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list | tuple) or not min_items <= len(v) <= max_items:
            raise _Invalid(f"must be a list of {min_items}..{max_items} items, got {_show(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(check(x))
            except _Invalid as exc:
                raise _Invalid(exc.problem, (f"[{i}]", *exc.path)) from None
        return tuple(out)

    return check_list


def map_of(key: Check, value: Check, max_items: int = MAX_ITEMS) -> Check:
    def check_map(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict) or len(v) > max_items:
            raise _Invalid(f"must be an object of at most {max_items} entries, got {_show(v)}")
        out = {}
        for k, x in v.items():
            try:
                ck = key(k)  # the key first: a bad key is the problem, not its value
                out[ck] = value(x)
            except _Invalid as exc:
                raise _Invalid(exc.problem, (f"[{_show(k)}]", *exc.path)) from None
        return out

    return check_map


def disk_key(v: Any) -> str:
    """A disk id written as a JSON object key ("7")."""
    if not isinstance(v, str) or not DISK_KEY_RE.fullmatch(v) or int(v) > MAX_DISK_ID:
        raise _Invalid(f"must be a disk id in decimal, got {_show(v)}")
    return v


def pair(first: Check, second: Check) -> Check:
    def check(v: Any) -> tuple[Any, Any]:
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise _Invalid(f"must be a list of two items, got {_show(v)}")
        return (first(v[0]), second(v[1]))

    return check


def json_value(v: Any, depth: int = 0) -> Any:
    """Free-form JSON (parts of status replies that only get displayed): bounded depth and sizes, finite
    numbers, integers within 64 bits, strings that can be encoded. Lists stay lists."""
    if v is None or isinstance(v, bool):
        return v
    if _is_int(v):
        if not -(2**63) <= v <= MAX_COUNT:
            raise _Invalid(f"must be an integer within 64 bits, got {_show(v)}")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _Invalid(f"must be a finite number, got {_show(v)}")
        return v
    if isinstance(v, str):
        return _text_check(MAX_CONTROL_PAYLOAD, False, "text without NUL")(v)
    if depth >= MAX_JSON_DEPTH:
        raise _Invalid(f"nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(v, list | tuple):
        if len(v) > MAX_ITEMS:
            raise _Invalid(f"must be a list of at most {MAX_ITEMS} items, got {_show(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(json_value(x, depth + 1))
            except _Invalid as exc:
                raise _Invalid(exc.problem, (f"[{i}]", *exc.path)) from None
        return out
    if isinstance(v, dict):
        if len(v) > MAX_ITEMS:
            raise _Invalid(f"must be an object of at most {MAX_ITEMS} keys, got {_show(v)}")
        obj = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise _Invalid(f"must have text keys, got {_show(k)}")
            try:
                obj[k] = json_value(x, depth + 1)
            except _Invalid as exc:
                raise _Invalid(exc.problem, (k, *exc.path)) from None
        return obj
    raise _Invalid(f"must be a JSON value, got {_show(v)}")


def record(checks: Mapping[str, Check]) -> Check:
    """A JSON object that must hold `checks`' keys with valid values and may hold more (free-form): for
    replies that people read (status), which grow a field now and then."""

    def check(v: Any) -> dict[str, Any]:
        obj = json_value(v)
        if not isinstance(obj, dict):
            raise _Invalid(f"must be an object, got {_show(v)}")
        for k, c in checks.items():
            if k not in obj:
                raise _Invalid("is missing", (k,))
            try:
                obj[k] = c(obj[k])
            except _Invalid as exc:
                raise _Invalid(exc.problem, (k, *exc.path)) from None
        return obj

    return check


def nested(cls: type[Wire]) -> Check:
    def check(v: Any) -> Wire:
        if isinstance(v, cls):
            return v
        return cls._parse(v)

    return check


# ---- the base of every request, reply and nested object ----------------------------------------------

W = TypeVar("W", bound="Wire")


def _f(check: Check, default: Any = MISSING) -> Any:
    """A dataclass field with its check; with a default, the key may be absent on the wire."""
    if default is MISSING:
        return field(metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _to_json(v: Any) -> Any:
    if isinstance(v, Wire):
        return v.to_wire()
    if isinstance(v, list | tuple):
        return [_to_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    return v


class Wire:
    """Base: validation in the constructor, `from_wire(dict)` for a peer's JSON, `to_wire()` for ours."""

    __slots__ = ()
    WHAT: ClassVar[str] = "message"  # names the message in errors: the op, "disk_open reply", ...
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()  # keys left out of to_wire() when None

    def __post_init__(self) -> None:
        for f in _fields_of(type(self)):
            v = getattr(self, f.name)
            try:
                nv = f.metadata["check"](v)
            except _Invalid as exc:
                raise InvalidMessage(self.WHAT, (f.name, *exc.path), exc.problem) from None
            if nv is not v:
                object.__setattr__(self, f.name, nv)
        try:
            self._check()
        except _Invalid as exc:
            raise InvalidMessage(self.WHAT, exc.path, exc.problem) from None

    def _check(self) -> None:
        """Rules between fields; raise _Invalid."""

    @classmethod
    def _parse(cls: type[W], data: Any) -> W:
        """Internal: the dataclass of a peer's JSON object, or _Invalid with the path to the bad value."""
        if not isinstance(data, dict):
            raise _Invalid(f"must be an object, got {_show(data)}")
        known = _fields_of(cls)
        names = {f.name for f in known}
        for k in data:
            if k not in names:
                raise _Invalid("is not a field of this message", (_show(k) if not isinstance(k, str) else k,))
        for f in known:
            if f.name not in data and f.default is MISSING:
                raise _Invalid("is missing", (f.name,))
        try:
            return cls(**data)
        except InvalidMessage as exc:
            raise _Invalid(exc.problem, exc.path) from None

    @classmethod
    def from_wire(cls: type[W], data: Any, code: str = "bad-input", what: str | None = None) -> W:
        """Check a peer's JSON object; BadRequest(code) naming `what` (default: the class's op) if invalid."""
        try:
            return cls._parse(data)
        except _Invalid as exc:
            where = _path_text(exc.path)
            label = what or cls.WHAT
            raise BadRequest(code, f"{label}: {where} {exc.problem}" if where else f"{label}: {exc.problem}") from None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object to send (the same keys and values today's daemons send)."""
        out = {}
        for f in _fields_of(type(self)):
            v = getattr(self, f.name)
            if v is None and f.name in self.OMIT_NONE:
                continue
            out[f.name] = _to_json(v)
        return out


_FIELDS: dict[type, tuple[Field[Any], ...]] = {}


def _fields_of(cls: type) -> tuple[Field[Any], ...]:
    got = _FIELDS.get(cls)
    if got is None:
        got = _FIELDS[cls] = fields(cls)
    return got


def message(what: str) -> Callable[[type[W]], type[W]]:
    """Class decorator: a frozen, slotted dataclass named `what` in errors."""

    def wrap(cls: type[W]) -> type[W]:
        cls.WHAT = what
        return dataclass(frozen=True, slots=True)(cls)

    return wrap
