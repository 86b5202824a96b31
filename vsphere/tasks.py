"""Waiting for a vSphere task, and saying what went wrong in vSphere's own terms.

pyVim.task.WaitForTask is not used: against govmomi's simulator it raises a TypeError on
VirtualDiskManager tasks, and it waits without a bound. This polls `info.state` with a deadline and turns
an error into RequestFailed naming the task, the object it ran on and the fault.

`task.info` is never read whole: the simulator gives a VirtualDiskManager task that manager as its
`info.entity`, which pyVmomi refuses to deserialize (it expects a ManagedEntity). The state, result and
error are read by path through the PropertyCollector instead."""

from __future__ import annotations

import time
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode

TASK_TIMEOUT = 600.0
POLL = 0.05


class TaskFailed(RequestFailed):
    """A vSphere task ended in error: `fault` is the fault's type name (FileAlreadyExists, InvalidState...)."""

    def __init__(self, what: str, fault: str, message: str) -> None:
        super().__init__(ErrorCode.FAILED, f"{what} failed in vSphere: {fault}: {message}")
        self.fault = fault


def fault_text(fault: Any) -> tuple[str, str]:
    """(type name, message) of a vSphere fault object or exception."""
    if fault is None:
        return "UnknownFault", "no fault given"
    name = type(fault).__name__.rpartition(".")[2]
    msg = getattr(fault, "msg", None) or ""
    details = [m.message for m in (getattr(fault, "faultMessage", None) or []) if getattr(m, "message", None)]
    if details:
        msg = (msg + " " if msg else "") + "(" + "; ".join(details) + ")"
    return name, msg or "(no message)"


def wait(task: Any, what: str, timeout: float = TASK_TIMEOUT) -> Any:
    """The task's result once it succeeded. `what` names the step for the error ("create disk [ds] x.vmdk
    for VM mt01"). TaskFailed when it ended in error; RequestFailed(FAILED) when it did not end in time
    (the task may still finish in vCenter: the message says to look at its task list)."""
    deadline = time.monotonic() + timeout
    while True:
        info = _info(task)
        state = str(info.get("info.state"))
        if state == "success":
            return info.get("info.result")
        if state == "error":
            name, msg = fault_text(info.get("info.error"))
            raise TaskFailed(what, name, msg)
        if time.monotonic() > deadline:
            raise RequestFailed(
                ErrorCode.FAILED,
                f"{what}: vSphere task {task._moId} still {state} after {timeout:.0f} s; look at the vCenter's "
                "task list before retrying",
            )
        time.sleep(POLL)


def _info(task: Any) -> dict[str, Any]:
    """{"info.state": ..., "info.result": ..., "info.error": ...} of the task (an unset one absent)."""
    from .api import vim, vmodl

    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=task, skip=False)],
                         propSet=[pc.PropertySpec(type=vim.Task, pathSet=["info.state", "info.result", "info.error"])])
    # "propertyCollector" is the collector's fixed id in vCenter and ESXi (ServiceContent.propertyCollector)
    collector = vmodl.query.PropertyCollector("propertyCollector", task._stub)
    return {p.name: p.val for o in collector.RetrieveContents([spec]) for p in o.propSet or []}


def call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one vSphere call (or start one task); a fault it raises becomes TaskFailed naming `what`."""
    from .api import vmodl

    try:
        return fn(*args, **kwargs)
    except vmodl.MethodFault as exc:
        name, msg = fault_text(exc)
        raise TaskFailed(what, name, msg) from None
