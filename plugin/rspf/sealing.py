"""Authenticated encryption of values at rest (AES-256-GCM) with a key that never leaves memory."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import StoreError
from .secret import Secret

_VERSION = b"\x01"


class Sealer:
    """Seal/open byte strings; ``aad`` binds a ciphertext to its place (table, row) so rows cannot be swapped."""

    __slots__ = ("_aead",)

    def __init__(self, key: Secret, purpose: bytes, salt: bytes | None = None) -> None:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"onem2m-rspf " + purpose).derive(
            key.reveal()
        )
        self._aead = AESGCM(derived)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 29 or blob[:1] != _VERSION:
            raise StoreError("a sealed value is damaged")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], aad)
        except InvalidTag:
            raise StoreError("a sealed value failed its integrity check (wrong key or tampered data)") from None

    def __repr__(self) -> str:
        return "<Sealer redacted>"
