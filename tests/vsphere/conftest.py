"""Fixtures for the vSphere tests: the simulator binary (built once), a fresh simulator per test, and a
local deployment whose process server talks to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy import LocalDeployment
from tests.integration import conftest as integration

from . import simulator as sim

# A process server (real TLS, its own process) with the deployment's admin identity; logs at teardown.
deployment = integration.deployment


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    why = sim.missing()
    if why:
        pytest.skip(f"vSphere simulator unavailable: {why}")
    return sim.build()


@pytest.fixture
def start_vcsim(vcsim_binary: Path, tmp_path: Path) -> Iterator[Callable[..., sim.Simulator]]:
    """start_vcsim(*flags): a simulator of its own (flags of tools/vcsim/main.go), stopped after the test."""
    started: list[sim.Simulator] = []

    def start(*flags: str) -> sim.Simulator:
        s = sim.start(vcsim_binary, tmp_path / f"vcsim{len(started)}", *flags)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def vcsim(start_vcsim: Callable[..., sim.Simulator]) -> sim.Simulator:
    """A vCenter with one datacenter: a cluster of 3 hosts and a standalone host, one VMFS datastore, 2 VMs
    per resource pool (4 VMs: DC0_H0_VM0, DC0_H0_VM1, DC0_C0_RP0_VM0, DC0_C0_RP0_VM1), every one
    with VMware Tools running."""
    return start_vcsim()


@pytest.fixture
def site(deployment: LocalDeployment, vcsim: sim.Simulator, tmp_path: Path) -> Iterator[dict[str, object]]:
    """Two sites in the simulator with data on loop devices (sites.make_site)."""
    from .sites import make_site

    yield from make_site(deployment, vcsim, tmp_path)
