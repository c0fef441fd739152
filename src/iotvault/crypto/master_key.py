"""The master key: the one secret outside the database, which wraps every per-device data key.

Keeping the master key in a file of its own, beside rather than inside the database, means a
stolen database dump or backup holds only wrapped keys and ciphertext. Per-device data keys,
each wrapped by the master key, make deleting a device's key enough to make its events
unreadable everywhere, backups included (crypto-shredding), and let one device's key rotate
without touching any other device.

The file is one text line, ``iotvault-master-key-v1:`` followed by the URL-safe base64 of 32
random bytes, so that a person restoring a backup can recognise it and a future format can
be told apart. Losing the file loses every event, so it is written durably and never
overwritten.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.errors import KeyUnwrapError, MasterKeyError

KEY_LEN: Final = 32

_FILE_PREFIX: Final = "iotvault-master-key-v1:"
# Far more than one line needs; a larger file is not ours, and is not read whole.
_MAX_FILE_BYTES: Final = 1024
_FINGERPRINT_LABEL: Final = b"iotvault/master-key-fingerprint/v1"
_WRAP_FORMAT: Final = 0x01
_WRAP_FORMAT_BYTE: Final = b"\x01"
_WRAP_AAD_PREFIX: Final = b"iotvault/data-key/v1\x00"
_NONCE_LEN: Final = 12
_WRAPPED_LEN: Final = 1 + _NONCE_LEN + KEY_LEN + 16


def generate_data_key() -> bytes:
    """Draw a fresh 256-bit key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_LEN)


class MasterKey:
    """The master key, usable only to wrap and unwrap data keys.

    The raw bytes are not kept as an attribute and never appear in ``repr``, so that logging
    or a traceback with locals cannot leak them; the fingerprint identifies the key instead.
    """

    __slots__ = ("_aead", "_fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"a master key has {KEY_LEN} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        digest = hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).digest()
        self._fingerprint = digest[:16].hex()

    @classmethod
    def from_bytes(cls, key: bytes) -> MasterKey:
        """Build a key from raw bytes; meant for tests, production keys come from a file."""
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path, *, create: bool = True) -> MasterKey:
        """Load the key file, creating it first if it is missing and ``create`` is true.

        Several processes may start at once on an empty installation: the file is written
        under a temporary name and hard-linked into place, which never replaces an existing
        file, so exactly one key wins and every process loads that one. The file is mode 0600
        from its first byte (``O_EXCL`` with an explicit mode), and a file that group or
        others could read or change is refused rather than silently repaired, because the
        key may already have leaked and the operator should know.
        """
        key = _read_key_file(path)
        if key is not None:
            return cls(key)
        if not create:
            raise MasterKeyError(
                str(path),
                "does not exist; restore it from your backup, or allow iotvault to create a new key "
                "(only for a new installation: events sealed under the old key stay unreadable)",
            )
        _create_key_file(path)
        key = _read_key_file(path)
        if key is None:
            raise MasterKeyError(str(path), "disappeared right after it was created")
        return cls(key)

    @property
    def fingerprint(self) -> str:
        """A public identifier of the key, stored in the database to catch a wrong key file.

        It is an HMAC under the key of a fixed label, so it reveals nothing about the key.
        """
        return self._fingerprint

    def wrap_data_key(self, device_id: str, version: int, data_key: bytes) -> bytes:
        """Seal a data key for storage beside the device it belongs to.

        The associated data binds the device and the version, so that a wrapped key copied to
        another device or version row fails to unwrap instead of silently serving it.
        """
        if len(data_key) != KEY_LEN:
            raise ValueError(f"a data key has {KEY_LEN} bytes, got {len(data_key)}")
        aad = _wrap_aad(device_id, version)
        nonce = secrets.token_bytes(_NONCE_LEN)
        return b"".join((_WRAP_FORMAT_BYTE, nonce, self._aead.encrypt(nonce, data_key, aad)))

    def unwrap_data_key(self, device_id: str, version: int, wrapped: bytes) -> bytes:
        """Open a wrapped data key; any failure is a :class:`KeyUnwrapError`, never garbage."""
        if len(wrapped) != _WRAPPED_LEN or wrapped[0] != _WRAP_FORMAT:
            raise KeyUnwrapError(device_id, version)
        try:
            aad = _wrap_aad(device_id, version)
            return self._aead.decrypt(wrapped[1 : 1 + _NONCE_LEN], wrapped[1 + _NONCE_LEN :], aad)
        except (InvalidTag, ValueError, OverflowError) as exc:
            raise KeyUnwrapError(device_id, version) from exc

    def __repr__(self) -> str:
        return f"<MasterKey fingerprint={self._fingerprint}>"


def _wrap_aad(device_id: str, version: int) -> bytes:
    # Only one field has a variable length and the version has a fixed one at the end, so
    # this encoding is unambiguous even for ids that contain NUL.
    return b"".join((_WRAP_AAD_PREFIX, device_id.encode(), b"\x00", version.to_bytes(4, "big")))


def _read_key_file(path: Path) -> bytes | None:
    """Return the key held in ``path``, or None if there is no such file."""
    try:
        # O_NONBLOCK so that a FIFO in the key's place is refused below instead of hanging.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MasterKeyError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    try:
        # fstat on the open file, not stat on the name, so the checked file is the read one.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(str(path), "is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise MasterKeyError(
                str(path),
                f"is accessible to group or others (mode {mode:04o}); run chmod 600 {path}, "
                "and replace the key if others may have read it",
            )
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise MasterKeyError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return _parse_key_file(path, data)


def _parse_key_file(path: Path, data: bytes) -> bytes:
    malformed = MasterKeyError(
        str(path),
        f"is not an iotvault master key file (expected one line '{_FILE_PREFIX}<base64>'); "
        "restore the file from your backup",
    )
    if len(data) > _MAX_FILE_BYTES:
        raise malformed
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise malformed from exc
    if not text.startswith(_FILE_PREFIX):
        raise malformed
    encoded = text.removeprefix(_FILE_PREFIX)
    try:
        key = base64.urlsafe_b64decode(encoded)
    except (binascii.Error, ValueError) as exc:
        raise malformed from exc
    # urlsafe_b64decode skips characters outside the alphabet; insist on the canonical text.
    if base64.urlsafe_b64encode(key).decode("ascii") != encoded:
        raise malformed
    if len(key) != KEY_LEN:
        raise MasterKeyError(
            str(path), f"holds a {len(key)}-byte key, a master key has {KEY_LEN}; restore it from your backup"
        )
    return key


def _create_key_file(path: Path) -> None:
    line = f"{_FILE_PREFIX}{base64.urlsafe_b64encode(generate_data_key()).decode('ascii')}\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _make_private_dirs(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                with os.fdopen(fd, "wb", closefd=False) as file:
                    file.write(line.encode("ascii"))
                    file.flush()
                    os.fsync(fd)
            finally:
                os.close(fd)
            # A hard link never replaces an existing file: if another process got there
            # first, its key stands and the caller loads it.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise MasterKeyError(str(path), f"cannot be created: {exc.strerror or exc}") from exc


def _make_private_dirs(directory: Path) -> None:
    # Path.mkdir(parents=True) gives intermediate directories the default mode; create each
    # missing one with 0700 so no new directory on the way is listable by others.
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(mode=0o700, exist_ok=True)


def _fsync_dir(directory: Path) -> None:
    # Without this a power cut could lose the new directory entry, and with it the key of
    # events already committed to the database.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
