"""The one module that imports pyvmomi (STYLE.md): everything else reaches vSphere's types (`vim`,
`vmodl`) and the login calls through it. The other vsphere modules import it inside their functions, so
a process server with no vCenter added never loads pyvmomi's type tables."""

from __future__ import annotations

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

__all__ = ["Disconnect", "SmartConnect", "vim", "vmodl"]
