"""Checks of the single values in control requests and replies: each is a function value -> value
(possibly normalised: a list becomes a tuple, a word its enum member) that raises `Invalid` with what was
wrong; proto.wire's `checked(check)` gives a typed message's field its check.

`Wire`, `message`, `InvalidMessage` and `BadRequest` lived here before proto.wire existed; they are
imported below under their own names so that `from standby.proto.fields import Wire` keeps working.

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
file name           one path component: no '/', not '.' or     a name looked up in one directory (find_device's
                    '..', no control character, 1..255 bytes   by-id name) must not lead out of it; NAME_MAX
system uuid         "" (unknown) or a uuid as above            SMBIOS product UUID; firmware may report none
device wait         finite, 0 .. 300 s                         a guest shows a hot-added disk in seconds; the
                                                               request must end well within a session's life
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
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from .enums import Consistency, MarkerKind, ReplicaFormat
from .frames import MAX_CONTROL_PAYLOAD
from .states import DiskState, Replication
from .wire import BadRequest as BadRequest
from .wire import Check, Invalid, Wire, show
from .wire import InvalidMessage as InvalidMessage
from .wire import message as message

# ---- bounds (see the table above) --------------------------------------------------------------------

SECTOR = 512
MAX_DISK_ID = 2**32 - 1
MAX_SEQUENCE = 2**63 - 1
MAX_COUNT = 2**63 - 1
MAX_GENERATION = 2**32 - 1
MAX_DISK_SIZE = 2**50
TIME_MIN = 946_684_800.0  # 2000-01-01T00:00:00Z
TIME_MAX = 7_258_118_400.0  # 2200-01-01T00:00:00Z
MAX_POINT_TIME = 1e11  # year 5138: beyond it a marker's time is not a wall-clock time (proto.point.meta_time)
MAX_SECONDS = 10**9
MAX_TAG = 200  # agent.appoint.MAX_TAG
MAX_TEXT = 4096
MAX_SHORT = 255  # host names, tracker names, point choices
MAX_PATH = 4095  # Linux PATH_MAX (4096) less the NUL
MAX_FILE_NAME = 255  # Linux NAME_MAX
MAX_DEVICE_WAIT = 300  # seconds find_device may wait for a hot-added disk to show in the guest
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
DISK_KEY_RE = re.compile(r"[1-9][0-9]{0,9}")  # a disk id as a JSON object key (mt_report)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads makes lone surrogates; they cannot be encoded

ROLES = ("agent", "mt", "admin", "ps", "enroll")  # proto.messages.ROLES
ENROLL_ROLES = ("agent", "mt")
RESYNC_MODES = ("checksum", "full")
RESYNC_PHASES = ("waiting", "hashing", "comparing", "shipping", "complete")  # agent.resync.Progress.phase
# The words of proto.enums as plain tuples, for the daemons that test membership or list the choices.
REPLICA_FORMATS = tuple(f.value for f in ReplicaFormat)
MARKER_KINDS = tuple(k.value for k in MarkerKind)
CONSISTENCIES = tuple(c.value for c in Consistency)


# ---- field checks: value -> value (possibly normalised: lists become tuples), or Invalid ---------------


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_range(lo: int, hi: int, what: str) -> Check:
    def check(v: Any) -> int:
        if not is_int(v) or not lo <= v <= hi:
            raise Invalid(f"must be {what}, got {show(v)}")
        return v

    return check


def _number_range(lo: float, hi: float, what: str) -> Check:
    """int or float (kept as given: a MARKER's seal covers its JSON, so 5 must not become 5.0)."""

    def check(v: Any) -> int | float:
        # NaN compares false and the bounds are finite, so nan and +-inf fail the range test too.
        if not (is_int(v) or isinstance(v, float)) or not lo <= v <= hi:
            raise Invalid(f"must be {what}, got {show(v)}")
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
port = _int_range(1, 65535, "a TCP port (1..65535)")
device_wait = _number_range(0, MAX_DEVICE_WAIT, f"a wait in seconds (a finite number 0..{MAX_DEVICE_WAIT})")


def size(v: Any) -> int:
    if not is_int(v) or not 0 < v <= MAX_DISK_SIZE or v % SECTOR:
        raise Invalid(f"must be a positive multiple of 512 bytes (at most 1 PiB), got {show(v)}")
    return v


def stored_time(v: Any) -> int | float:
    """A time the master target keeps in its own state files, where 0 means "not set yet"."""
    if v == 0 and not isinstance(v, bool):
        return v
    return time_(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid(f"must be true or false, got {show(v)}")
    return v


def name(v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise Invalid(
            f"must be a name of 1..63 letters, digits, '.', '_' or '-' starting with a letter or digit, got {show(v)}"
        )
    return v


def uuid_text(v: Any) -> str:
    if isinstance(v, str) and len(v) == 36:
        try:
            if str(uuid.UUID(v)) == v:
                return v
        except ValueError:
            pass
    raise Invalid(f"must be a UUID in canonical form (8-4-4-4-12 lower-case hex digits), got {show(v)}")


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
        raise Invalid(
            f"must be an absolute path without '..' segments or control characters (at most {MAX_PATH} bytes), "
            f"got {show(v)}"
        )
    return v


def file_name(v: Any) -> str:
    """One component of a path: what is looked up inside a directory the receiver chose, never beside it."""
    ok = (
        isinstance(v, str)
        and v not in ("", ".", "..")
        and "/" not in v
        and not _CONTROL.search(v)
        and not _SURROGATE.search(v)
        and len(v.encode()) <= MAX_FILE_NAME
    )
    if not ok:
        raise Invalid(
            f"must be a file name (no '/', not '.' or '..', no control characters, 1..{MAX_FILE_NAME} bytes), "
            f"got {show(v)}"
        )
    return v


def system_uuid(v: Any) -> str:
    """A machine's SMBIOS system UUID, or "" when its firmware reports none (or it could not be read)."""
    if v == "":
        return v
    try:
        return uuid_text(v)
    except Invalid:
        raise Invalid(f"must be a UUID in canonical form or \"\" (unknown), got {show(v)}") from None


def _text_check(limit: int, printable: bool, what: str) -> Check:
    def check(v: Any) -> str:
        ok = isinstance(v, str) and len(v) <= limit and not _SURROGATE.search(v)
        if ok and (v.isprintable() if printable else "\x00" not in v):
            return v
        raise Invalid(f"must be {what}, got {show(v)}")

    return check


tag = _text_check(MAX_TAG, True, f"printable text of at most {MAX_TAG} characters")
text = _text_check(MAX_TEXT, False, f"text of at most {MAX_TEXT} characters without NUL")
short_text = _text_check(MAX_SHORT, True, f"printable text of at most {MAX_SHORT} characters")
passphrase = _text_check(MAX_PASSPHRASE, False, f"text of at most {MAX_PASSPHRASE} characters without NUL")


def secret(v: Any) -> str:
    """A password: like `passphrase`, but a refusal never shows the value (refusals are logged)."""
    if isinstance(v, str) and 0 < len(v) <= MAX_PASSPHRASE and "\x00" not in v and not _SURROGATE.search(v):
        return v
    raise Invalid(f"must be text of 1..{MAX_PASSPHRASE} characters without NUL (the value is not shown)")


def point_choice(v: Any) -> str:
    """--point: latest, latest-processed, latest-app, SEQ or DISK:SEQ; the process server's `choose` says
    which of those exist. Here only its shape is bounded."""
    if not isinstance(v, str) or not v or len(v) > MAX_SHORT or not v.isprintable():
        raise Invalid(f"must be a point (latest, latest-processed, latest-app, SEQ or DISK:SEQ), got {show(v)}")
    return v


def pem(v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_PEM or not v.startswith("-----BEGIN ") or not v.isascii():
        raise Invalid(f"must be PEM text (-----BEGIN ...) of at most {MAX_PEM} bytes, got {show(v)}")
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
        raise Invalid(f"must be {what} ({lo}..{hi} bytes, base64), got {show(v)}")

    return check


wrapped_key = base64_bytes(1, MAX_WRAPPED_KEY, "a wrapped data key")
sealed_hashes = base64_bytes(28, MAX_SEALED_HASHES, "sealed hashes")  # nonce 12 + GCM tag 16 at least
hash_nonce = base64_bytes(8, 64, "a query nonce")


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}, got {show(v)}")
        return v

    return check


E = TypeVar("E", bound=StrEnum)


def member_of(enum: type[E]) -> Check:
    """One of an enum's words (proto.enums); the value becomes its member, which is still that string."""
    choices = ", ".join(enum)

    def check(v: Any) -> E:
        if not isinstance(v, str):
            raise Invalid(f"must be one of {choices}, got {show(v)}")
        try:
            return enum(v)
        except ValueError:
            raise Invalid(f"must be one of {choices}, got {show(v)}") from None

    return check


replica_format = member_of(ReplicaFormat)
consistency = member_of(Consistency)
marker_kind = member_of(MarkerKind)
replication_state = member_of(Replication)  # proto.states
replica_state = member_of(DiskState)
resync_mode = one_of(*RESYNC_MODES)


def optional(check: Check) -> Check:
    def opt(v: Any) -> Any:
        return None if v is None else check(v)

    return opt


def list_of(check: Check, max_items: int = MAX_ITEMS, min_items: int = 0) -> Check:
    def check_list(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list | tuple) or not min_items <= len(v) <= max_items:
            raise Invalid(f"must be a list of {min_items}..{max_items} items, got {show(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(check(x))
            except Invalid as exc:
                raise Invalid(exc.problem, (f"[{i}]", *exc.path)) from None
        return tuple(out)

    return check_list


def map_of(key: Check, value: Check, max_items: int = MAX_ITEMS) -> Check:
    def check_map(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict) or len(v) > max_items:
            raise Invalid(f"must be an object of at most {max_items} entries, got {show(v)}")
        out = {}
        for k, x in v.items():
            try:
                ck = key(k)  # the key first: a bad key is the problem, not its value
                out[ck] = value(x)
            except Invalid as exc:
                raise Invalid(exc.problem, (f"[{show(k)}]", *exc.path)) from None
        return out

    return check_map


def disk_key(v: Any) -> str:
    """A disk id written as a JSON object key ("7")."""
    if not isinstance(v, str) or not DISK_KEY_RE.fullmatch(v) or int(v) > MAX_DISK_ID:
        raise Invalid(f"must be a disk id in decimal, got {show(v)}")
    return v


def pair(first: Check, second: Check) -> Check:
    def check(v: Any) -> tuple[Any, Any]:
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise Invalid(f"must be a list of two items, got {show(v)}")
        return (first(v[0]), second(v[1]))

    return check


def json_value(v: Any, depth: int = 0) -> Any:
    """Free-form JSON (parts of status replies that only get displayed): bounded depth and sizes, finite
    numbers, integers within 64 bits, strings that can be encoded. Lists stay lists."""
    if v is None or isinstance(v, bool):
        return v
    if is_int(v):
        if not -(2**63) <= v <= MAX_COUNT:
            raise Invalid(f"must be an integer within 64 bits, got {show(v)}")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise Invalid(f"must be a finite number, got {show(v)}")
        return v
    if isinstance(v, str):
        return _text_check(MAX_CONTROL_PAYLOAD, False, "text without NUL")(v)
    if depth >= MAX_JSON_DEPTH:
        raise Invalid(f"nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(v, list | tuple):
        if len(v) > MAX_ITEMS:
            raise Invalid(f"must be a list of at most {MAX_ITEMS} items, got {show(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(json_value(x, depth + 1))
            except Invalid as exc:
                raise Invalid(exc.problem, (f"[{i}]", *exc.path)) from None
        return out
    if isinstance(v, dict):
        if len(v) > MAX_ITEMS:
            raise Invalid(f"must be an object of at most {MAX_ITEMS} keys, got {show(v)}")
        obj = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise Invalid(f"must have text keys, got {show(k)}")
            try:
                obj[k] = json_value(x, depth + 1)
            except Invalid as exc:
                raise Invalid(exc.problem, (k, *exc.path)) from None
        return obj
    raise Invalid(f"must be a JSON value, got {show(v)}")


def record(checks: Mapping[str, Check]) -> Check:
    """A JSON object that must hold `checks`' keys with valid values and may hold more (free-form): for
    replies that people read (status), which grow a field now and then."""

    def check(v: Any) -> dict[str, Any]:
        obj = json_value(v)
        if not isinstance(obj, dict):
            raise Invalid(f"must be an object, got {show(v)}")
        for k, c in checks.items():
            if k not in obj:
                raise Invalid("is missing", (k,))
            try:
                obj[k] = c(obj[k])
            except Invalid as exc:
                raise Invalid(exc.problem, (k, *exc.path)) from None
        return obj

    return check


def nested(cls: type[Wire]) -> Check:
    def check(v: Any) -> Wire:
        if isinstance(v, cls):
            return v
        return cls._parse(v)

    return check
