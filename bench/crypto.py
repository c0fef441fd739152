"""What field encryption costs per event, against the bare AES-GCM calls it is built on.

Both sides seal and open the same ~150-byte payload with a 256-bit key:

* ``raw``: ``AESGCM.encrypt`` + ``AESGCM.decrypt`` with a fixed nonce and associated data
  prepared in advance, the floor that no record format can go below;
* ``iotvault``: ``KeyRing.encrypt`` + ``KeyRing.decrypt``, the calls ingest and the API make per
  event: data-key cache lookup, a fresh random nonce, the associated data built from the ids,
  the self-describing record, and the checks;
* ``record``: ``seal_record`` + ``open_record`` alone, the positional record functions the key
  ring calls, with the keys already at hand (a :class:`~iotvault.crypto.cipher.SealingKey`
  bound in advance, as the ring keeps one per device, and a one-entry dict for the lookup):
  the cost of the record format itself, so that ``iotvault - record`` is the key ring's and
  cache's share;
* ``nonce``: ``os.urandom(12)`` alone, the fresh nonce each record asks the OS for (the
  design refuses buffered or counter nonces, see :mod:`iotvault.crypto.cipher`).

Each is timed with :mod:`timeit` (best of several repeats, as its documentation advises).
"""

from __future__ import annotations

import os
import tempfile
import timeit
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.publisher import payload_pool
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.crypto.cipher import bind_key, key_version_bytes, open_record, seal_record
from iotvault.devices import register_device

DEVICE = "bench-0001"
EVENT = "0190f3c8-6f2e-7a3b-9c1d-2e4f6a8b0c1d"


@dataclass
class CryptoResult:
    payload_bytes: int
    raw_us: float
    record_us: float
    iotvault_us: float
    nonce_us: float  # os.urandom(12): the fresh nonce every record asks the OS for

    @property
    def ratio(self) -> float:
        return self.iotvault_us / self.raw_us


def _best_us(fn: object, number: int, repeat: int) -> float:
    times = timeit.repeat(fn, number=number, repeat=repeat)  # type: ignore[arg-type]
    return min(times) / number * 1e6


def measure(number: int = 20_000, repeat: int = 5) -> CryptoResult:
    payload = payload_pool(1, seed=7)[0]
    with tempfile.TemporaryDirectory(prefix="iotvault-bench-crypto-") as tmp:
        settings = load_settings(environ={"IOTVAULT_DATA_DIR": str(Path(tmp) / "data")})
        with context(settings) as ctx:
            register_device(ctx, "bench", DEVICE)
            ring = ctx.keyring
            version, aead = ring.current(DEVICE)  # warms the cache, as a running ingest has it
            record = ring.encrypt(DEVICE, EVENT, payload)
            if ring.decrypt(DEVICE, EVENT, record) != payload:
                raise RuntimeError("round trip failed")

            nonce = os.urandom(12)
            aad = f"iotvault/event/v1\x00{DEVICE}\x00{EVENT}\x00".encode() + version.to_bytes(4, "big")
            sealed = aead.encrypt(nonce, payload, aad)

            def raw() -> None:
                aead.encrypt(nonce, payload, aad)
                aead.decrypt(nonce, sealed, aad)

            sealing = bind_key(aead, DEVICE, version)  # the ring binds it once per device and ttl
            prepared = {(DEVICE, key_version_bytes(version)): aead}

            def no_load(_device_id: str, _version: int) -> AESGCM:
                raise RuntimeError("the prepared key must be found")

            sealed_record = seal_record(sealing, EVENT, payload)
            if open_record(prepared.get, no_load, DEVICE, EVENT, sealed_record) != payload:
                raise RuntimeError("round trip through the record functions failed")

            def rec() -> None:
                r = seal_record(sealing, EVENT, payload)
                open_record(prepared.get, no_load, DEVICE, EVENT, r)

            def ours() -> None:
                ring.decrypt(DEVICE, EVENT, ring.encrypt(DEVICE, EVENT, payload))

            def fresh_nonce() -> None:
                os.urandom(12)

            # interleaved, so that a burst of load elsewhere on the machine hits all of them
            raw_us, rec_us, ours_us, nonce_us = [], [], [], []
            for _ in range(repeat):
                raw_us.append(_best_us(raw, number, 1))
                rec_us.append(_best_us(rec, number, 1))
                ours_us.append(_best_us(ours, number, 1))
                nonce_us.append(_best_us(fresh_nonce, number, 1))
    if not isinstance(aead, AESGCM):
        raise TypeError("the key ring did not give an AESGCM")
    return CryptoResult(len(payload), min(raw_us), min(rec_us), min(ours_us), min(nonce_us))
