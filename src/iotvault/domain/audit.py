"""The audit log's hash chain: how a record is linked to the one before it, and how a chain is checked.

Pure: no I/O, no clock, no database. The storage (:mod:`iotvault.storage.audit`) writes what
:func:`link` returns and the verifier reads it back through :func:`verify`.

Why a chain and signed checkpoints, and what each catches. Every record holds the hash of the
record before it and its own hash over its fields and that link, so editing a record, deleting
one or moving one breaks the chain at that record. A chain alone does not stop someone with write
access to the database from rewriting the tail and recomputing every hash after it, nor from
cutting the tail off: so the head of the chain (sequence number and hash) is signed periodically
with an Ed25519 key that only the master key unwraps (:mod:`iotvault.crypto.audit_signing`), and may
be exported outside the database. A rewrite before the newest checkpoint no longer matches it; a
truncation leaves the chain shorter than a checkpoint names.

The hashed bytes are canonical JSON (sorted keys, no spaces, UTF-8), with a version field so the
format can change without making old records unverifiable. :func:`canonical` is their definition
and what the verifier hashes; the writer builds the same bytes with :func:`entry_hash`, from the
detail's JSON text that it also needs for its column, instead of a document's dict and a second
encoding of the detail (``tests/unit/test_audit_chain.py`` pins the two to each other and to
fixed hashes).
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "Anchor",
    "AuditEntry",
    "AuditRecord",
    "Checkpoint",
    "Fields",
    "Verdict",
    "canonical",
    "detail_text",
    "entry_hash",
    "link",
    "printable",
    "verify",
]

FORMAT_VERSION: Final = 1
GENESIS: Final = "0" * 64  # the "hash" before the first record
OUTCOMES: Final = frozenset({"success", "failure", "denied", "error"})


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What happened: the fields a caller gives; the log adds the sequence number and hashes.

    ``actor`` is ``kind:id`` (``user:alice``, ``apikey:k_…``, ``device:d1``, ``system``,
    ``cli``); ``detail`` is small JSON that never holds a secret or a payload.
    """

    at_us: int
    actor: str
    action: str
    target: str
    outcome: str
    client: str = ""
    request_id: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {sorted(OUTCOMES)}, not {self.outcome!r}")
        if not self.actor or not self.action:
            raise ValueError("an audit entry needs an actor and an action")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An entry as stored: its place in the chain, the hash it follows and its own."""

    seq: int
    entry: AuditEntry
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Anchor:
    """A point of the chain: record ``seq`` has hash ``hash`` (``seq`` 0 is the start)."""

    seq: int
    hash: str


START: Final = Anchor(0, GENESIS)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed head: record ``seq`` had hash ``hash`` at ``at_us`` (:mod:`iotvault.crypto.audit_signing`)."""

    seq: int
    hash: str
    at_us: int
    signature: str  # base64url, unpadded

    @property
    def anchor(self) -> Anchor:
        return Anchor(self.seq, self.hash)


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x0a``), so that no name, topic or detail
    a client chose can forge or split a log line."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def canonical(seq: int, entry: AuditEntry, prev_hash: str) -> bytes:
    """The bytes a record's hash covers: every field, its place and its predecessor's hash."""
    document = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "at": entry.at_us,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "outcome": entry.outcome,
        "client": entry.client,
        "request_id": entry.request_id,
        "detail": dict(entry.detail),
        "prev": prev_hash,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# What json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False) uses: one
# encoder made once (dumps makes one per call), and its function for a string (the C one)
_CANONICAL: Final = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))
_quote: Final = json.encoder.encode_basestring


def detail_text(detail: Mapping[str, Any]) -> str:
    """``detail`` as :func:`canonical` encodes it inside the document (for :func:`entry_hash`)."""
    return _CANONICAL.encode(detail if type(detail) is dict else dict(detail))


Fields = tuple[int, str, str, str, str, str, str]
"""An entry's ``at_us``, ``actor``, ``action``, ``target``, ``outcome``, ``client`` and ``request_id``."""


def entry_hash(seq: int, fields: Fields, detail_json: str, prev_hash: str) -> str:
    """The hash :func:`link` gives the entry with these ``fields``, whose detail :func:`detail_text`
    encoded as ``detail_json``: the bytes of :func:`canonical`, written out in its key order.

    ``seq`` and ``at_us`` are written with ``:d``, which is how JSON writes an ``int`` and refuses
    a float (but writes ``True`` as 1, where JSON says true): the writer stores ``int(at_us)``
    and hashes that. ``json.encoder.encode_basestring`` is what ``JSONEncoder`` writes a string
    with when ``ensure_ascii`` is off (not in the module's documented API; the tests pin it).
    """
    at_us, actor, action, target, outcome, client, request_id = fields
    q = _quote
    text = (
        f'{{"action":{q(action)},"actor":{q(actor)},"at":{at_us:d},"client":{q(client)},"detail":{detail_json},'
        f'"outcome":{q(outcome)},"prev":{q(prev_hash)},"request_id":{q(request_id)},"seq":{seq:d},'
        f'"target":{q(target)},"v":{FORMAT_VERSION}}}'
    )
    return hashlib.sha256(text.encode()).hexdigest()


def link(seq: int, entry: AuditEntry, prev_hash: str) -> AuditRecord:
    """The record that puts ``entry`` at ``seq``, after the record whose hash is ``prev_hash``."""
    return AuditRecord(seq, entry, prev_hash, hashlib.sha256(canonical(seq, entry, prev_hash)).hexdigest())


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of :func:`verify`: ``bad_seq`` names the first record that does not hold."""

    ok: bool
    checked: int
    head: Anchor
    bad_seq: int | None = None
    reason: str = ""


def verify(
    records: Iterable[AuditRecord], *, start: Anchor = START, checkpoints: Iterable[Anchor] = ()
) -> Verdict:
    """Walk ``records`` (in stored order) from ``start`` and check every link and hash.

    ``checkpoints`` are signed heads already checked for their signatures: each must name a
    record of the chain with exactly that hash, and none may lie past the chain's end (a
    truncated tail). The first failure wins, named by the sequence number where it shows.
    """
    pending = {c.seq: c.hash for c in checkpoints if c.seq > start.seq}
    prev = start
    checked = 0
    for record in records:
        expected = prev.seq + 1
        if record.seq != expected:
            what = "is missing" if record.seq > expected else "is out of order"
            return Verdict(False, checked, prev, expected, f"record {expected} {what} (found {record.seq})")
        if record.prev_hash != prev.hash:
            return Verdict(
                False, checked, prev, record.seq, f"record {record.seq} does not follow {prev.seq}"
            )
        if link(record.seq, record.entry, record.prev_hash).hash != record.hash:
            return Verdict(False, checked, prev, record.seq, f"record {record.seq} was altered")
        signed = pending.pop(record.seq, None)
        if signed is not None and signed != record.hash:
            return Verdict(
                False, checked, prev, record.seq, f"record {record.seq} differs from its signed checkpoint"
            )
        prev = Anchor(record.seq, record.hash)
        checked += 1
    if pending:
        last = max(pending)
        return Verdict(
            False, checked, prev, prev.seq + 1,
            f"the chain ends at record {prev.seq} but a signed checkpoint names record {last} (truncated)",
        )  # fmt: skip
    return Verdict(True, checked, prev)
