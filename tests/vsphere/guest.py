"""The data side of the end-to-end vSphere tests: what a hypervisor and udev do for the disks of a
simulator VM, played with loop devices.

govmomi's simulator creates, attaches and detaches VMDK files for real, but they hold no data and no guest
sees them. Here every VMDK path of the simulator has an image file of its own (`Images`); a `Guest`
watches one VM (a master target's) and, while a VMDK is attached to it, shows it the way Linux does with
disk.EnableUUID=TRUE: a block device (a loop device over the VMDK's image) linked as
<by-id dir>/wwn-0x<the disk UUID>. When the VMDK is detached, the link and the loop device go away. So
the master target finds and writes real block devices, and what it wrote is in the image of the VMDK
that vSphere hands to another VM afterwards."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from standby.vsphere.connect import VCenter, connect
from standby.vsphere.disks import guest_device_name
from standby.vsphere.inventory import vm_info
from standby.vsphere.objects import find_vm


@dataclass
class Images:
    root: Path
    uuids: dict[str, str] = field(default_factory=dict)  # VMDK path -> disk UUID (the simulator forgets it)
    sizes: dict[str, int] = field(default_factory=dict)

    def image(self, vmdk: str, size: int | None = None) -> Path:
        """The image file holding the data of VMDK `vmdk` ("[ds] folder/x.vmdk"), made sparse on first use."""
        p = self.root / (vmdk.replace("[", "").replace("]", "").replace(" ", "_").replace("/", "__") + ".img")
        if not p.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            size = size or self.sizes[vmdk]
            with open(p, "wb") as f:
                f.truncate(size)
        return p

    def know(self, vmdk: str, uuid: str, size: int) -> None:
        self.uuids[vmdk], self.sizes[vmdk] = uuid, size


class Guest:
    def __init__(self, vc: VCenter, vm: str, by_id: Path, images: Images) -> None:
        self.vc, self.vm, self.by_id, self.images = vc, vm, by_id, images
        by_id.mkdir(parents=True, exist_ok=True)
        self.shown: dict[str, tuple[str, Path]] = {}  # VMDK path -> (loop device, by-id link)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"guest-{vm}", daemon=True)

    def start(self) -> Guest:
        self._thread.start()
        return self

    def _run(self) -> None:
        with connect(self.vc) as s:
            while not self._stop.is_set():
                try:
                    self._sync(s)
                except Exception as exc:  # noqa: BLE001 - reported by the test through self.errors
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.1)

    def _sync(self, s: object) -> None:
        disks = vm_info(s, find_vm(s, self.vm)).disks  # type: ignore[arg-type]
        now = set()
        for d in disks:
            uuid = d.uuid or self.images.uuids.get(d.file, "")
            size = d.capacity_bytes or self.images.sizes.get(d.file, 0)
            if not uuid or not size:
                continue  # a disk of the VM's own (its system disk): not one of ours
            self.images.know(d.file, uuid, size)
            now.add(d.file)
            if d.file not in self.shown:
                loop = subprocess.run(["losetup", "--find", "--show", str(self.images.image(d.file))], check=True,
                                      capture_output=True, text=True).stdout.strip()
                link = self.by_id / guest_device_name(uuid)
                link.symlink_to(loop)
                self.shown[d.file] = (loop, link)
        for gone in set(self.shown) - now:
            self._hide(gone)

    def _hide(self, vmdk: str) -> None:
        loop, link = self.shown.pop(vmdk)
        link.unlink(missing_ok=True)
        for _ in range(50):  # the master target closes it first (release); a moment more is fine
            if subprocess.run(["losetup", "-d", loop], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        self.errors.append(f"cannot detach {loop} ({vmdk})")

    def devices(self) -> dict[str, str]:
        """{VMDK path: loop device} shown now."""
        return {f: loop for f, (loop, _) in self.shown.items()}

    def shows(self, files: set[str], timeout: float = 10.0) -> bool:
        """Whether the guest comes to show exactly the VMDKs `files` within `timeout` (it looks every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while set(self.shown) != files:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for vmdk in list(self.shown):
            self._hide(vmdk)
