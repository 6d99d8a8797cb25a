"""A container for key material whose text forms never reveal the value."""

from __future__ import annotations

import hmac


class Secret:
    """Key bytes that never show up in ``repr``, ``str``, f-strings or exception texts.

    The value is reachable only through :meth:`reveal`, so every place that touches the bytes
    is easy to find with grep.
    """

    __slots__ = ("_value", "_label")

    def __init__(self, value: bytes, label: str = "secret") -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError("Secret holds bytes")
        self._value = bytes(value)
        self._label = label

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<Secret {self._label}: {len(self._value)} bytes, redacted>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._value, other._value)
        return NotImplemented

    def __hash__(self) -> int:  # pragma: no cover - secrets are not meant as dict keys
        raise TypeError("Secret is not hashable")

    def __reduce__(self):  # never pickle key material by accident
        raise TypeError("Secret cannot be pickled")


def constant_time_equal(a: bytes | str, b: bytes | str) -> bool:
    """Compare two values in time independent of where they differ."""
    if isinstance(a, str):
        a = a.encode("utf-8")
    if isinstance(b, str):
        b = b.encode("utf-8")
    return hmac.compare_digest(a, b)
