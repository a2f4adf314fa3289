"""The audit trail: an append-only table whose rows each carry a keyed hash of the row before.

``hash = HMAC-SHA256(key, prev_hash | seq | at | actor | action | target | detail)`` in a canonical JSON
form, so editing any field of any row, deleting a row or cutting the tail (the head row keeps the last hash)
breaks the chain and :func:`verify_chain` says where; and since the key lives outside the database (the
file ``audit.key`` in the data folder, mode 0600, or the environment variable ``COVIDSCAN_AUDIT_KEY``),
whoever can write the database cannot recompute the hashes after an edit. A chain cut back to an earlier
point (a "rewound" head) is caught against a head exported earlier (:func:`head_text`, :func:`check_head`).

Signed verdicts are inside the chain: every ``signature`` and ``amendment`` event holds the SHA-256 of the
verdict's content (:func:`review_digest`), and :func:`verify_chain` checks the ``reviews`` table against it.

Chains written before the key existed stay readable: the start that creates ``audit.key`` appends an
``audit_keyed`` event that names the last unkeyed (legacy) event; events up to it are checked with plain
SHA-256, and the report says how many there are. (A service upgraded with ``COVIDSCAN_AUDIT_KEY`` set from
its first start has no key file made, so no legacy mark: start it once without the variable instead.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError, StorageError
from covidscan.service.models import AuditEvent, AuditHead, Review, utcnow

GENESIS = "0" * 64  # prev_hash of the first event; the initial migration seeds the head row with it
KEY_FILE = "audit.key"
KEYED = "audit_keyed"  # the event from which on every hash is keyed; its detail names the legacy events
SIGNED_ACTIONS = ("signature", "amendment")  # the events whose detail holds a verdict's content hash


def load_audit_key(data_dir: Path, env_value: str | None = None) -> tuple[bytes, bool]:
    """The chain's key and whether it was made just now: ``env_value`` (``COVIDSCAN_AUDIT_KEY``) when
    given, else the data folder's ``audit.key``, created with 0600 permissions (32 random bytes, hex) when
    there is none yet."""
    if env_value:
        return env_value.encode(), False
    path = Path(data_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key:
            raise ConfigError(f"the audit key file {path} is empty; restore it from a backup") from None
        return key.encode(), False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode(), True


def _key(db: Session) -> bytes:
    key = db.info.get("audit_key")
    if not key:
        raise StorageError("this database session has no audit key: open the service with open_service")
    return key


def _digest(
    key: bytes | None,
    prev_hash: str,
    seq: int,
    at: str,
    actor: str | None,
    action: str,
    target: str | None,
    detail: dict[str, Any],
) -> str:
    """HMAC-SHA256 of the canonical row; plain SHA-256 for legacy (``key`` None) events."""
    body = json.dumps(
        [prev_hash, seq, at, actor, action, target, detail],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _stamp(event: AuditEvent) -> str:
    # Microsecond ISO text in UTC: what both back ends give back unchanged.
    return event.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def review_digest(review: Review) -> str:
    """SHA-256 of what a signed verdict says: case, review id, version, signer, signed time, agree,
    finding, comment and amendment reason."""
    signed = review.signed_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if review.signed_at else None
    body = json.dumps(
        [review.case_id, review.id, review.version, review.reviewer_id, signed, review.agree, review.finding,
         review.comment, review.amendment_reason],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def record(
    db: Session, action: str, *, actor: str | None, target: str | None = None, **detail: Any
) -> AuditEvent:
    """Append one event in the caller's transaction.

    The head row is updated first: that takes the row lock (PostgreSQL) or the write lock (SQLite), so
    concurrent appends queue up and the chain stays a single line.
    """
    key = _key(db)
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
    event.hash = _digest(key, prev, event.seq, _stamp(event), actor, action, target, detail)
    head.hash = event.hash
    db.add(event)
    db.flush()
    return event


def mark_keyed(db: Session) -> None:
    """At the start that made the key file, if the chain was written without a key (an older version),
    append the ``audit_keyed`` event naming the last unkeyed event (and the newest verdict then), so that
    later checks know where the legacy part ends. Only then: a chain rewritten without the key later must
    not be taken for a legacy one. A fresh chain is keyed from its first event and needs no mark."""
    head = db.get(AuditHead, 1)
    newest = db.get(AuditEvent, head.seq) if head is not None and head.seq else None
    if newest is None:
        return
    content = (newest.prev_hash, newest.seq, _stamp(newest), newest.actor, newest.action, newest.target,
               newest.detail)
    if not hmac.compare_digest(_digest(None, *content), newest.hash):
        return  # keyed already (or damaged: `audit-log verify` says so, a mark would not help)
    last_review = db.scalar(select(func.max(Review.id))) or 0
    record(db, KEYED, actor=None, target="audit", legacy_until=head.seq, reviews_before=last_review + 1)


@dataclass(frozen=True)
class ChainReport:
    """The result of checking the chain: ``ok`` and, when not, the first bad sequence number and why;
    ``legacy`` counts the events written before the chain was keyed (checked unkeyed)."""

    ok: bool
    n_events: int
    bad_seq: int | None = None
    reason: str | None = None
    legacy: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS


def _legacy_until(db: Session, key: bytes) -> int:
    """The last unkeyed event's seq (0 when the chain is keyed from its start); the first ``audit_keyed``
    event says it, and it must itself verify with the key (else it was forged and nothing is legacy)."""
    mark = db.scalars(select(AuditEvent).where(AuditEvent.action == KEYED).order_by(AuditEvent.seq)).first()
    if mark is None:
        return 0
    digest = _digest(key, mark.prev_hash, mark.seq, _stamp(mark), mark.actor, mark.action, mark.target,
                     mark.detail)
    legacy = int(mark.detail.get("legacy_until", 0))
    return legacy if hmac.compare_digest(digest, mark.hash) and legacy == mark.seq - 1 else 0


def verify_chain(db: Session) -> ChainReport:
    """Recompute every hash in order and report the first edited, missing or reordered row; then check
    every signed verdict in ``reviews`` against the hash its signature event holds."""
    key = _key(db)
    legacy = _legacy_until(db, key)
    prev, expected_seq, n = GENESIS, 1, 0
    signed: dict[int, tuple[int, str]] = {}  # review id -> (event seq, content hash)
    reviews_before = 0
    for event in db.scalars(select(AuditEvent).order_by(AuditEvent.seq)).yield_per(1000):
        n += 1
        if event.seq != expected_seq:
            return ChainReport(
                False, n, expected_seq, f"event {expected_seq} is missing (next is {event.seq})"
            )
        if event.prev_hash != prev:
            return ChainReport(False, n, event.seq, "its prev_hash does not match the event before it")
        digest = _digest(
            None if event.seq <= legacy else key,
            prev, event.seq, _stamp(event), event.actor, event.action, event.target, event.detail,
        )
        if not hmac.compare_digest(digest, event.hash):
            return ChainReport(
                False, n, event.seq,
                "its content was changed after it was written (or the audit key is not the one it was "
                "written with)",
            )
        if event.action in SIGNED_ACTIONS and "review_sha256" in event.detail:
            signed[int(event.detail["review_id"])] = (event.seq, str(event.detail["review_sha256"]))
        if event.action == KEYED and event.seq == legacy + 1:
            reviews_before = int(event.detail.get("reviews_before", 0))
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
    for review in db.scalars(select(Review).where(Review.signed_at.is_not(None)).order_by(Review.id)):
        seq, digest = signed.get(review.id, (None, None))
        if digest is None and (legacy == 0 or review.id >= reviews_before):
            return ChainReport(False, n, None, f"tampered: review {review.id} of case {review.case_id} is "
                               "signed but no signature in the log holds it")
        if digest is not None and digest != review_digest(review):
            return ChainReport(False, n, seq, f"tampered: review {review.id} of case {review.case_id} "
                               "differs from what was signed")
    return ChainReport(True, n, legacy=legacy, head_seq=head.seq, head_hash=head.hash)


def head_text(report: ChainReport) -> str:
    """The head of a verified chain as ``SEQ:HASH``: kept elsewhere, it later shows a rewound chain."""
    return f"{report.head_seq}:{report.head_hash}"


def check_head(db: Session, exported: str) -> str | None:
    """Why the chain does not contain a head exported earlier (``SEQ:HASH``), or None when it does."""
    seq_text, _, digest = exported.strip().partition(":")
    if not seq_text.isdigit() or len(digest) != 64:
        raise ConfigError(f"--head {exported.strip()!r} is not SEQ:HASH as `covidscan audit-log head` prints")
    event = db.get(AuditEvent, int(seq_text))
    if event is None:
        return f"event {seq_text} of the exported head is gone: the log was cut back (rewound)"
    if not hmac.compare_digest(event.hash, digest):
        return f"event {seq_text} no longer has the exported hash: the log was rewritten from there on"
    return None
