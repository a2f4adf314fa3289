"""The audit trail: an append-only table whose rows each carry the hash of the row before.

``hash = SHA-256(prev_hash | seq | at | actor | action | target | detail)`` in a canonical JSON form, so
editing any field of any row, deleting a row or cutting the tail (the head row keeps the last hash)
breaks the chain and :func:`verify_chain` says where.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from covidscan.errors import StorageError
from covidscan.service.models import AuditEvent, AuditHead, utcnow

GENESIS = "0" * 64  # prev_hash of the first event; the initial migration seeds the head row with it


def _digest(
    prev_hash: str,
    seq: int,
    at: str,
    actor: str | None,
    action: str,
    target: str | None,
    detail: dict[str, Any],
) -> str:
    body = json.dumps(
        [prev_hash, seq, at, actor, action, target, detail],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _stamp(event: AuditEvent) -> str:
    # Microsecond ISO text in UTC: what both back ends give back unchanged.
    return event.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(
    db: Session, action: str, *, actor: str | None, target: str | None = None, **detail: Any
) -> AuditEvent:
    """Append one event in the caller's transaction.

    The head row is updated first: that takes the row lock (PostgreSQL) or the write lock (SQLite), so
    concurrent appends queue up and the chain stays a single line.
    """
    head_updated = db.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1))
    if head_updated.rowcount != 1:  # the migration creates it, so appends never race to insert it
        raise StorageError("the audit log's head row is missing: the database was not set up by covidscan")
    head = db.execute(
        select(AuditHead).where(AuditHead.id == 1).execution_options(populate_existing=True)
    ).scalar_one()
    prev = head.hash  # the newest event's hash (GENESIS before the first)
    event = AuditEvent(
        seq=head.seq,
        at=utcnow(),
        actor=actor,
        action=action,
        target=target,
        detail=detail,
        prev_hash=prev,
        hash="",
    )
    event.hash = _digest(prev, event.seq, _stamp(event), actor, action, target, detail)
    head.hash = event.hash
    db.add(event)
    db.flush()
    return event


@dataclass(frozen=True)
class ChainReport:
    """The result of checking the chain: ``ok`` and, when not, the first bad sequence number and why."""

    ok: bool
    n_events: int
    bad_seq: int | None = None
    reason: str | None = None


def verify_chain(db: Session) -> ChainReport:
    """Recompute every hash in order; report the first edited, missing or reordered row."""
    prev, expected_seq, n = GENESIS, 1, 0
    for event in db.scalars(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000):
        n += 1
        if event.seq != expected_seq:
            return ChainReport(
                False, n, expected_seq, f"event {expected_seq} is missing (next is {event.seq})"
            )
        if event.prev_hash != prev:
            return ChainReport(False, n, event.seq, "its prev_hash does not match the event before it")
        digest = _digest(
            prev, event.seq, _stamp(event), event.actor, event.action, event.target, event.detail
        )
        if digest != event.hash:
            return ChainReport(False, n, event.seq, "its content was changed after it was written")
        prev, expected_seq = event.hash, expected_seq + 1
    head = db.get(AuditHead, 1)
    if head is None:  # it holds the newest hash: without it, a cut tail would pass unseen
        return ChainReport(False, n, expected_seq - 1, "the log's head row (the newest hash) was deleted")
    if head.seq != expected_seq - 1 or head.hash != prev:
        return ChainReport(
            False,
            n,
            head.seq,
            f"the log ends at event {expected_seq - 1} but {head.seq} "
            "were written: the newest events were deleted",
        )
    return ChainReport(True, n)
