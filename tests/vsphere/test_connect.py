"""Connecting to vCenter: the certificate pinned by fingerprint, the login refused with a clear reason."""

from __future__ import annotations

import dataclasses

import pytest

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode
from standby.vsphere.connect import connect, fetch_certificate, fingerprint_of


def test_pinned_certificate_logs_in(vcsim) -> None:
    assert fingerprint_of(fetch_certificate(vcsim.host, vcsim.port)) == vcsim.fingerprint
    with connect(vcsim.vcenter()) as s:
        assert s.content.about.apiType == "VirtualCenter"


def test_other_fingerprint_is_refused_before_login(vcsim) -> None:
    vc = dataclasses.replace(vcsim.vcenter(), fingerprint="sha256:" + "0" * 64)
    with pytest.raises(RequestFailed) as e:
        connect(vc)
    assert e.value.code == ErrorCode.REFUSED
    assert "not the one pinned" in str(e.value) and "Not logged in" in str(e.value)


def test_wrong_password_is_refused(vcsim) -> None:
    vc = dataclasses.replace(vcsim.vcenter(), password="nope")
    with pytest.raises(RequestFailed) as e:
        connect(vc)
    assert e.value.code == ErrorCode.REFUSED and "wrong user name or password" in str(e.value)
    assert "nope" not in str(e.value)


def test_nothing_listening_is_unreachable(vcsim) -> None:
    vcsim.stop()
    with pytest.raises(RequestFailed) as e:
        connect(vcsim.vcenter())
    assert e.value.code == ErrorCode.UNREACHABLE


def test_find_vm_by_name_and_uuid_and_properties(vcsim) -> None:
    from standby.vsphere.api import vim
    from standby.vsphere.objects import container, find_vm, properties

    with connect(vcsim.vcenter()) as s:
        vms = container(s, vim.VirtualMachine)
        props = properties(s, vms, vim.VirtualMachine, ["name", "config.uuid", "snapshot"])
        assert len(vms) == 4 and all("snapshot" not in p for p in props.values())
        name, p = next((p["name"], p) for p in props.values())
        assert find_vm(s, name) == find_vm(s, p["config.uuid"].upper())
        with pytest.raises(RequestFailed) as e:
            find_vm(s, "no-such-vm")
        assert e.value.code == ErrorCode.MISSING and name in str(e.value)
