"""Which machine a daemon runs on, told to the process server once per connection (`about`): the SMBIOS
system UUID and the host name. With vCenter, the system UUID is how a standby machine (an agent, a master
target) is matched to its VM: a VMware VM's SMBIOS UUID is its BIOS UUID (`config.uuid` in the vSphere API).

The UUID is read from /sys/class/dmi/id/product_uuid (readable by root only; the daemons run as root), or
taken from `system_uuid` in agent.toml / mt.toml, which wins: for firmware that reports none (or a
placeholder, all zeros or all ones) and for tests. Unknown is "", never a guess.

An older process server does not know the request: it answers `unknown-request`, which is said once at
INFO and otherwise ignored. Any other failure is logged and ignored too: replication never depends on it.
"""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path
from typing import Any

from standby.proto.enums import ErrorCode
from standby.proto.requests import About, InvalidMessage

from .errors import BadInput, RequestFailed
from .link import Link, LinkClosed

log = logging.getLogger("standby.about")
DMI_PRODUCT_UUID = Path("/sys/class/dmi/id/product_uuid")
# What firmware without a UUID reports instead (SMBIOS: all zeros "not present", all ones "not set").
PLACEHOLDERS = frozenset({str(uuid.UUID(int=0)), str(uuid.UUID(int=(1 << 128) - 1))})
ABOUT_TIMEOUT = 30.0


def canonical_uuid(text: str) -> str | None:
    """`text` as a canonical lower-case UUID, or None if it is none (or a placeholder)."""
    try:
        u = str(uuid.UUID(text.strip()))
    except (ValueError, AttributeError):
        return None
    return None if u in PLACEHOLDERS else u


def parse_system_uuid(value: Any) -> str | None:
    """The `system_uuid` config key: None if absent (read the firmware's), "" to say unknown, else a UUID in
    any form uuid.UUID reads (normalised). BadInput otherwise."""
    if value is None or value == "":
        return value
    got = canonical_uuid(value) if isinstance(value, str) else None
    if got is None:
        raise BadInput(f"system_uuid must be a UUID (8-4-4-4-12 hex digits) or \"\", not {value!r}")
    return got


def read_system_uuid(path: Path = DMI_PRODUCT_UUID) -> str:
    """The firmware's system UUID, or "" if it is missing, unreadable (not root) or a placeholder."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        log.info("no system UUID from %s (%s): set system_uuid in the config if vCenter must match this machine",
                 path, exc.strerror or exc)
        return ""
    return canonical_uuid(text) or ""


class AboutReporter:
    """A daemon's `about`: worked out once at start (the machine does not change under a running daemon),
    sent at the start of every session."""

    def __init__(self, configured: str | None, dmi: Path = DMI_PRODUCT_UUID) -> None:
        system_uuid = configured if configured is not None else read_system_uuid(dmi)
        hostname = socket.gethostname()
        try:
            self.about = About(system_uuid, hostname)
        except InvalidMessage:  # a host name of unprintable characters: for people only, so leave it out
            self.about = About(system_uuid, "")
        self.said_older = False

    async def tell(self, link: Link) -> None:
        """Send `about` on `link` and wait for the answer; never raises (but a cancellation)."""
        try:
            await link.request("about", timeout=ABOUT_TIMEOUT, **self.about.to_wire())
        except RequestFailed as exc:
            if exc.code != ErrorCode.UNKNOWN_REQUEST:
                log.warning("the process server refused this machine's system UUID and host name: %s", exc)
            elif not self.said_older:
                self.said_older = True
                log.info("the process server is older than the `about` request: it does not learn this machine's "
                         "system UUID (vCenter cannot match this machine to its VM by UUID)")
        except LinkClosed:
            pass  # the session is over; the next one tells it again
        except Exception as exc:
            log.warning("could not tell the process server this machine's system UUID and host name: %r", exc)
