"""Requests and replies of an enrollment connection (role `enroll`, before the machine has a certificate):
ca and enroll. Who may send which is in proto.requests' table of ops.
"""

from __future__ import annotations

from .fields import (
    ENROLL_ROLES,
    boolean,
    name,
    one_of,
    passphrase,
    pem,
)
from .wire import Invalid, Wire, checked, message


@message("ca")
class Ca(Wire):
    pass


@message("ca reply")
class CaCert(Wire):
    ca_pem: str = checked(pem)


@message("enroll")
class Enroll(Wire):
    name: str = checked(name)
    role: str = checked(one_of(*ENROLL_ROLES))
    passphrase: str = checked(passphrase)
    csr: str = checked(pem)
    replace: bool = checked(boolean, False)

    def _check(self) -> None:
        if self.name == "admin":
            raise Invalid("is reserved for the admin identity", ("name",))


@message("enroll reply")
class Enrolled(Wire):
    cert_pem: str = checked(pem)
    ca_pem: str = checked(pem)
