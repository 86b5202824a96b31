"""Wrapping a disk's data key to a master target's public key (promise 6). Pure: no files, no sockets.

The agent encrypts a disk's payloads with a random per-disk AES-256 *data key*. The process server
forwards ciphertext it must not be able to read, so the data key travels only *wrapped* to the master
target's public key (the EC P-256 key in its certificate): ECIES.

    wrap:   e  = fresh ephemeral P-256 key pair
            Z  = ECDH(e, recipient public key)
            K  = HKDF-SHA256(Z, salt=none, info = b"standby keywrap v1" + context, 32 bytes)
            ct = AES-256-GCM(K, nonce, data_key, associated data = context)

Wire layout, version 1 (126 bytes for a 32-byte data key):

    offset  size  field
    0       1     version = 1
    1       65    ephemeral public point, SEC1 uncompressed (0x04 || X || Y)
    66      12    GCM nonce
    78      48    ciphertext (32) + GCM tag (16)

Supported versions: 1 only. An unknown version is refused, never guessed at.

Threat: the process server (or anyone on the path) moving a wrapped key from one disk to another, so that
the master target would decrypt disk B's stream with disk A's key. The `context` names the disk (e.g.
b"disk:machine/sda") and enters both the key derivation and the GCM associated data: unwrapping under
any other context fails. Threat: tampering. GCM authenticates every byte; an altered ephemeral point
yields a different shared secret (or is rejected as off-curve), so any single change fails the unwrap.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
DATA_KEY_BYTES = 32  # AES-256
_POINT_BYTES = 65  # SEC1 uncompressed P-256 point
_NONCE_BYTES = 12  # GCM standard nonce; random is safe because every wrap uses a fresh derived key
_TAG_BYTES = 16
WRAPPED_BYTES = 1 + _POINT_BYTES + _NONCE_BYTES + DATA_KEY_BYTES + _TAG_BYTES  # 126
_INFO_PREFIX = b"standby keywrap v1"
MAX_CONTEXT_BYTES = 1024
"""A context is a short disk name; the bound keeps a hostile caller from feeding megabytes into HKDF."""


class KeyWrapError(Exception):
    """A data key could not be wrapped or unwrapped: bad key, wrong context, or altered/foreign bytes."""


def new_data_key() -> bytes:
    """32 random bytes from the OS CSPRNG: a fresh AES-256 data key for one disk."""
    return os.urandom(DATA_KEY_BYTES)


def wrap_key(data_key: bytes, recipient_public_key_pem: bytes, context: bytes) -> bytes:
    """Encrypt `data_key` so only the holder of the recipient's private key, asking for `context`, gets it.

    `recipient_public_key_pem` is SubjectPublicKeyInfo PEM (identity.cert_public_key_pem gives it).
    """
    if len(data_key) != DATA_KEY_BYTES:
        raise KeyWrapError(f"data key must be {DATA_KEY_BYTES} bytes, not {len(data_key)}")
    _check_context(context)
    try:
        recipient = serialization.load_pem_public_key(recipient_public_key_pem)
    except (ValueError, TypeError) as exc:
        raise KeyWrapError(f"recipient public key is not a PEM public key: {exc}") from exc
    if not isinstance(recipient, ec.EllipticCurvePublicKey) or not isinstance(recipient.curve, ec.SECP256R1):
        raise KeyWrapError("recipient public key must be EC P-256")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    kek = _derive(ephemeral.exchange(ec.ECDH(), recipient), context)
    nonce = os.urandom(_NONCE_BYTES)
    return bytes([VERSION]) + point + nonce + AESGCM(kek).encrypt(nonce, data_key, context)


def unwrap_key(wrapped: bytes, recipient_private_key_pem: bytes, context: bytes) -> bytes:
    """Recover the data key; KeyWrapError on any failure (parsed in order: length, version, point, tag)."""
    _check_context(context)
    if len(wrapped) != WRAPPED_BYTES:
        raise KeyWrapError(f"wrapped key must be {WRAPPED_BYTES} bytes, not {len(wrapped)}")
    if wrapped[0] != VERSION:
        raise KeyWrapError(f"unsupported wrapped-key version {wrapped[0]} (supported: {VERSION})")
    try:
        private = serialization.load_pem_private_key(recipient_private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyWrapError(f"recipient private key is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP256R1):
        raise KeyWrapError("recipient private key must be EC P-256")
    point = wrapped[1 : 1 + _POINT_BYTES]
    nonce = wrapped[1 + _POINT_BYTES : 1 + _POINT_BYTES + _NONCE_BYTES]
    sealed = wrapped[1 + _POINT_BYTES + _NONCE_BYTES :]
    try:
        # from_encoded_point rejects points not on the curve (threat: invalid-curve attacks on ECDH).
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        kek = _derive(private.exchange(ec.ECDH(), ephemeral), context)
        data_key = AESGCM(kek).decrypt(nonce, sealed, context)
    except (ValueError, InvalidTag) as exc:
        raise KeyWrapError(
            "wrapped key failed authentication: altered, for another disk, or for another recipient"
        ) from exc
    return data_key


def _derive(shared_secret: bytes, context: bytes) -> bytes:
    """The key-encryption key. The raw ECDH output is not uniformly random, hence HKDF before use."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO_PREFIX + context).derive(shared_secret)


def _check_context(context: bytes) -> None:
    # An empty context would bind the key to nothing, i.e. make it movable to any disk.
    if not isinstance(context, bytes | bytearray) or not 1 <= len(context) <= MAX_CONTEXT_BYTES:
        raise KeyWrapError(f"context must be 1 to {MAX_CONTEXT_BYTES} bytes naming the disk")


__all__ = ["DATA_KEY_BYTES", "WRAPPED_BYTES", "KeyWrapError", "new_data_key", "unwrap_key", "wrap_key"]
