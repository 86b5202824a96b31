"""`Wire`, the base of every typed request and reply (proto.requests): a frozen, slotted dataclass whose
fields each carry a check (proto.fields) run in the constructor, so an invalid one cannot exist; and the
two errors of a check, ours (`InvalidMessage`) and a peer's (`BadRequest`).

A check is a function value -> value (possibly normalised: a list becomes a tuple, a word its enum member)
that raises `Invalid(problem, path)`; `Wire` turns that into `InvalidMessage` when we build the message and
into `BadRequest` when a peer's JSON fails (`from_wire`). `Invalid`, `show` and `path_text` are proto's
own: the checks (proto.fields) and the typed messages use them, nothing outside proto/ does.

`to_wire()` gives the plain JSON a peer expects: nested messages as objects, tuples as lists, enum members
(proto.enums) as their strings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

from .enums import ErrorCode
from .errors import LocalProtocolError, RemoteProtocolError

Check = Callable[[Any], Any]

# ---- errors ------------------------------------------------------------------------------------------


def path_text(path: tuple[str, ...]) -> str:
    out = ""
    for p in path:
        out += p if p.startswith("[") or not out else "." + p
    return out


class InvalidMessage(LocalProtocolError):
    """We tried to build a request or reply with an invalid value (a bug on our side)."""

    def __init__(self, what: str, path: tuple[str, ...], problem: str) -> None:
        where = path_text(path)
        super().__init__(ErrorCode.BAD_INPUT, f"{what}: {where} {problem}" if where else f"{what}: {problem}")
        self.what, self.path, self.problem = what, path, problem


class BadRequest(RemoteProtocolError):
    """A peer sent an invalid request (code `bad-input`), an unknown one (`unknown-request`), one its role
    may not send (`forbidden`), an invalid reply (`bad-reply`) or an invalid MARKER meta (`bad-marker`);
    the code is a proto.enums.ErrorCode. `str(exc)` names the op, the field and what was wrong: it is what
    the peer is told."""


class Invalid(Exception):
    """Internal: a field check failed. `path` leads from the field to the bad value."""

    def __init__(self, problem: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(problem)
        self.problem, self.path = problem, path


def show(v: object) -> str:
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


# ---- the base of every request, reply and nested object ----------------------------------------------

W = TypeVar("W", bound="Wire")


def checked(check: Check, default: Any = MISSING) -> Any:
    """A dataclass field with its check; with a default, the key may be absent on the wire."""
    if default is MISSING:
        return field(metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _to_json(v: Any) -> Any:
    if isinstance(v, Wire):
        return v.to_wire()
    if isinstance(v, Enum):
        return v.value
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
            except Invalid as exc:
                raise InvalidMessage(self.WHAT, (f.name, *exc.path), exc.problem) from None
            if nv is not v:
                object.__setattr__(self, f.name, nv)
        try:
            self._check()
        except Invalid as exc:
            raise InvalidMessage(self.WHAT, exc.path, exc.problem) from None

    def _check(self) -> None:
        """Rules between fields; raise Invalid."""

    @classmethod
    def _parse(cls: type[W], data: Any) -> W:
        """Internal: the dataclass of a peer's JSON object, or Invalid with the path to the bad value."""
        if not isinstance(data, dict):
            raise Invalid(f"must be an object, got {show(data)}")
        known = _fields_of(cls)
        names = {f.name for f in known}
        for k in data:
            if k not in names:
                raise Invalid("is not a field of this message", (show(k) if not isinstance(k, str) else k,))
        for f in known:
            if f.name not in data and f.default is MISSING:
                raise Invalid("is missing", (f.name,))
        try:
            return cls(**data)
        except InvalidMessage as exc:
            raise Invalid(exc.problem, exc.path) from None

    @classmethod
    def from_wire(cls: type[W], data: Any, code: ErrorCode = ErrorCode.BAD_INPUT, what: str | None = None) -> W:
        """Check a peer's JSON object; BadRequest(code) naming `what` (default: the class's op) if invalid."""
        try:
            return cls._parse(data)
        except Invalid as exc:
            where = path_text(exc.path)
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
