"""Files holding secrets: created 0600, written atomically, refused when others can read them."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import ConfigError
from .secret import Secret


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never readable by others, even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_private(path: Path, what: str) -> None:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 600 {path}'"
        )


def read_key_file(path: Path | str, what: str = "key file") -> Secret:
    """Read a key stored as hex text (32 bytes or more) from a private file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    check_private(path, what)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what} {path} must contain the key as hexadecimal text") from None
    if not 16 <= len(value) <= 64:
        raise ConfigError(f"{what} {path} must hold a key of 16 to 64 bytes, it holds {len(value)}")
    return Secret(value, what)


def new_key_file(path: Path | str, length: int = 32) -> Secret:
    """Create a new random key (hex text, 0600). Refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    value = secrets.token_bytes(length)
    write_private(path, value.hex().encode() + b"\n")
    return Secret(value, "key")
