"""Key wrapping to a master target's public key: round trip, binding to the disk, and tamper detection."""

from __future__ import annotations

import ast
import inspect

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto import keywrap
from standby.proto.keywrap import KeyWrapError, new_data_key, unwrap_key, wrap_key

CONTEXT = b"disk:db01/sda"


def key_pair() -> tuple[bytes, bytes]:
    """(public_pem, private_pem) of a fresh P-256 key, as a master target's certificate would carry."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public, private


PUBLIC, PRIVATE = key_pair()
OTHER_PUBLIC, OTHER_PRIVATE = key_pair()


def test_round_trip_and_layout() -> None:
    data_key = new_data_key()
    assert len(data_key) == 32
    wrapped = wrap_key(data_key, PUBLIC, CONTEXT)
    assert len(wrapped) == 1 + 65 + 12 + 32 + 16
    assert wrapped[0] == 1 and wrapped[1] == 0x04  # version, uncompressed point
    assert data_key not in wrapped
    assert unwrap_key(wrapped, PRIVATE, CONTEXT) == data_key


def test_layout_matches_the_documented_construction() -> None:
    """Decrypt by hand from the module docstring's description: an oracle independent of unwrap_key."""
    data_key = new_data_key()
    wrapped = wrap_key(data_key, PUBLIC, CONTEXT)
    point, nonce, sealed = wrapped[1:66], wrapped[66:78], wrapped[78:]
    private = serialization.load_pem_private_key(PRIVATE, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    shared = private.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point))
    kek = HKDF(hashes.SHA256(), 32, salt=None, info=b"standby keywrap v1" + CONTEXT).derive(shared)
    assert AESGCM(kek).decrypt(nonce, sealed, CONTEXT) == data_key


def test_each_wrap_is_fresh() -> None:
    data_key = new_data_key()
    assert wrap_key(data_key, PUBLIC, CONTEXT) != wrap_key(data_key, PUBLIC, CONTEXT)
    assert new_data_key() != new_data_key()


def test_wrong_context_is_refused() -> None:
    wrapped = wrap_key(new_data_key(), PUBLIC, CONTEXT)
    with pytest.raises(KeyWrapError, match="another disk"):
        unwrap_key(wrapped, PRIVATE, b"disk:db01/sdb")


def test_wrong_recipient_is_refused() -> None:
    wrapped = wrap_key(new_data_key(), PUBLIC, CONTEXT)
    with pytest.raises(KeyWrapError):
        unwrap_key(wrapped, OTHER_PRIVATE, CONTEXT)


def test_every_single_flipped_byte_is_refused() -> None:
    wrapped = wrap_key(new_data_key(), PUBLIC, CONTEXT)
    for i in range(len(wrapped)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(wrapped)
            tampered[i] ^= mask
            with pytest.raises(KeyWrapError):
                unwrap_key(bytes(tampered), PRIVATE, CONTEXT)


def test_truncated_extended_and_future_versions_are_refused() -> None:
    wrapped = wrap_key(new_data_key(), PUBLIC, CONTEXT)
    for bad in (wrapped[:-1], wrapped + b"\0", b"", bytes([2]) + wrapped[1:]):
        with pytest.raises(KeyWrapError):
            unwrap_key(bad, PRIVATE, CONTEXT)
    with pytest.raises(KeyWrapError, match="unsupported wrapped-key version 2"):
        unwrap_key(bytes([2]) + wrapped[1:], PRIVATE, CONTEXT)


def test_bad_inputs_are_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rsa_private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyWrapError):
        wrap_key(b"short", PUBLIC, CONTEXT)
    with pytest.raises(KeyWrapError):
        wrap_key(new_data_key(), PUBLIC, b"")  # an empty context binds to nothing
    with pytest.raises(KeyWrapError):
        wrap_key(new_data_key(), PUBLIC, b"x" * 1025)
    for bad_public in (b"garbage", rsa_public, p384):
        with pytest.raises(KeyWrapError):
            wrap_key(new_data_key(), bad_public, CONTEXT)
    wrapped = wrap_key(new_data_key(), PUBLIC, CONTEXT)
    for bad_private in (b"garbage", rsa_private):
        with pytest.raises(KeyWrapError):
            unwrap_key(wrapped, bad_private, CONTEXT)


@settings(max_examples=50, deadline=None)
@given(
    data_key=st.binary(min_size=32, max_size=32),
    context=st.binary(min_size=1, max_size=256),
    other=st.binary(min_size=1, max_size=256),
)
def test_random_contexts(data_key: bytes, context: bytes, other: bytes) -> None:
    wrapped = wrap_key(data_key, PUBLIC, context)
    assert unwrap_key(wrapped, PRIVATE, context) == data_key
    if other != context:
        with pytest.raises(KeyWrapError):
            unwrap_key(wrapped, PRIVATE, other)


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, keywrap.WRAPPED_BYTES - 1), mask=st.integers(1, 255))
def test_random_tampering(position: int, mask: int) -> None:
    wrapped = bytearray(wrap_key(new_data_key(), PUBLIC, CONTEXT))
    wrapped[position] ^= mask
    with pytest.raises(KeyWrapError):
        unwrap_key(bytes(wrapped), PRIVATE, CONTEXT)


def test_module_does_no_io() -> None:
    """proto/ never does I/O: no sockets, ssl, asyncio, files or subprocesses imported."""
    tree = ast.parse(inspect.getsource(keywrap))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "ssl", "asyncio", "subprocess", "pathlib", "io", "shutil", "tempfile"}
    assert "open(" not in inspect.getsource(keywrap)
