"""Signed results back to the hospital's PACS: destinations, deliveries and the sender (issue 16 §3).

An admin configures destinations: a DICOM node (C-STORE with pynetdicom to host, port and called AE
title) or a DICOMweb server (STOW-RS: ``POST {url}/studies``, multipart/related application/dicom). When a
doctor signs a case, or signs an amendment, :func:`queue_deliveries` adds one delivery per active
destination in the same transaction as the signature. The worker's delivery thread (:class:`Sender`)
claims deliveries like jobs (a conditional UPDATE with an owner and a lease, so two workers never send the
same one and a delivery whose worker died is taken over), builds the DICOM outputs of the case's signed
version, sends them, and records ``delivery_sent`` or, after the last retry, ``delivery_failed`` in the
audit log. Failed attempts wait 1, 5, 15, then 60 minutes (``COVIDSCAN_DELIVERY_RETRY_SECONDS``).

The DICOM outputs (the SR and the Secondary Captures of the signed version) are built by an ``outputs``
callable; the worker's is :func:`default_outputs` (:func:`covidscan.service.records.dicom_outputs`). A
destination must be sent the same SOP Instance UIDs on every retry of a version, so that a retry after a
partial send leaves no duplicates: the records derive them from the case and version.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from covidscan.errors import CovidscanError
from covidscan.service.audit import record
from covidscan.service.db import Database
from covidscan.service.errors import Conflict, DestinationInvalid, ErrorCode
from covidscan.service.models import DESTINATION_KINDS, Case, Delivery, Destination, Review, User, utcnow
from covidscan.service.storage import BlobStore

log = logging.getLogger(__name__)

RETRY_SECONDS = (60.0, 300.0, 900.0, 3600.0)  # the waits after failed attempts; failed after the last
TIMEOUT = 30.0  # seconds: connecting, each DIMSE answer, an HTTP request
LEASE = timedelta(minutes=10)  # a delivery still "sending" after this is taken over by another worker
DEFAULT_CALLING_AE = "COVIDSCAN"
# An AE title: 1 to 16 characters of the Default Character Repertoire, no backslash, not only spaces.
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# The C-STORE statuses that mean the instance was stored (0x0000; 0xB000, 0xB006, 0xB007: stored with a
# warning, e.g. coerced elements), per PS3.4 Annex B.2.3.
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

Outputs = Callable[[Session, int], list[Dataset]]
"""Builds the DICOM outputs of a case's current signed version: ``outputs(session, case_id)``."""


def default_outputs(store: BlobStore) -> Outputs:
    """The SR and Secondary Captures of a case's signed version, from the records module: the one seam
    between sending and the records (``store`` holds the images and Grad-CAM overlays they are made of)."""

    def outputs(s: Session, case_id: int) -> list[Dataset]:
        from covidscan.service.records import dicom_outputs  # the records' own imports, only when sending

        return dicom_outputs(s, case_id, store)

    return outputs


class DeliveryError(CovidscanError):
    """A send that did not go through; the message says what the destination answered."""


# --- destinations (admins) -------------------------------------------------------------------------------

DESTINATION_FIELDS = (
    "name",
    "kind",
    "host",
    "port",
    "called_ae",
    "calling_ae",
    "url",
    "bearer_token",
    "basic_user",
    "basic_password",
    "active",
)


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _check(dest: Destination) -> None:
    """Refuse (422 ``destination_invalid``, naming the field) what cannot be sent to."""
    dest.name = (dest.name or "").strip()
    if not dest.name or len(dest.name) > 64:
        raise DestinationInvalid("name: give 1 to 64 characters")
    if dest.kind not in DESTINATION_KINDS:
        raise DestinationInvalid(f"kind: one of {', '.join(DESTINATION_KINDS)}, got {dest.kind!r}")
    if dest.kind == "dicom":
        dest.url = None
        if not dest.host or len(dest.host) > 255 or any(c.isspace() for c in dest.host):
            raise DestinationInvalid("host: the PACS's host name or IP address (no spaces)")
        if dest.port is None or not 1 <= dest.port <= 65535:
            raise DestinationInvalid("port: the PACS's DICOM port, 1 to 65535")
        dest.calling_ae = dest.calling_ae or DEFAULT_CALLING_AE
        for field in ("called_ae", "calling_ae"):
            value = getattr(dest, field)
            if not value or not AE_TITLE.match(value) or not value.strip():
                raise DestinationInvalid(
                    f"{field}: an AE title of 1 to 16 characters (letters, digits, spaces, no backslash), "
                    f"got {value!r}"
                )
    else:
        dest.host = dest.port = dest.called_ae = dest.calling_ae = None
        parts = urlsplit(dest.url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DestinationInvalid(
                f"url: the DICOMweb root, e.g. https://pacs.example.org/dicom-web, got {dest.url!r}"
            )
        dest.url = dest.url.rstrip("/")
    if dest.bearer_token and (dest.basic_user or dest.basic_password):
        raise DestinationInvalid("give a bearer token or a basic user and password, not both")
    if bool(dest.basic_user) != bool(dest.basic_password):
        raise DestinationInvalid("basic_user and basic_password go together")


def _flush_named(db: Session, dest: Destination) -> None:
    """Write ``dest``; another destination with its name is a 409 ``destination_name_taken``."""
    taken = Conflict(f"a destination called {dest.name!r} exists already", ErrorCode.DESTINATION_NAME_TAKEN)
    with db.no_autoflush:  # what the table holds, not ``dest`` itself flushed by the query
        holder = db.scalar(select(Destination.id).where(Destination.name == dest.name))
    if holder is not None and holder != dest.id:
        raise taken
    try:
        with db.begin_nested():
            db.flush()
    except IntegrityError:  # the same name added at the same moment
        raise taken from None


def _shown(dest: Destination) -> dict[str, Any]:
    """A destination's settings for the audit log: never its secrets, only which kind of login it has."""
    return {
        "name": dest.name,
        "kind": dest.kind,
        "host": dest.host,
        "port": dest.port,
        "called_ae": dest.called_ae,
        "calling_ae": dest.calling_ae,
        "url": dest.url,
        "auth": auth_kind(dest),
        "active": dest.active,
    }


def auth_kind(dest: Destination) -> str:
    """How covidscan logs in to a STOW-RS destination: ``none``, ``bearer`` or ``basic``."""
    return "bearer" if dest.bearer_token else "basic" if dest.basic_user else "none"


def list_destinations(db: Session) -> list[Destination]:
    """Every destination, by name."""
    return list(db.scalars(select(Destination).order_by(Destination.name)))


def add_destination(db: Session, values: dict[str, Any], actor: User) -> Destination:
    """A new destination from ``values`` (:data:`DESTINATION_FIELDS`); audit-logged."""
    dest = Destination(**{k: _blank_is_none(v) for k, v in values.items() if k in DESTINATION_FIELDS})
    dest.active = True if dest.active is None else dest.active
    _check(dest)
    db.add(dest)
    _flush_named(db, dest)
    record(db, "destination_add", actor=actor.name, target=f"destination:{dest.id}", **_shown(dest))
    return dest


def change_destination(db: Session, dest: Destination, changes: dict[str, Any], actor: User) -> Destination:
    """Change the fields in ``changes`` (an empty secret keeps the stored one only when not given);
    audit-logged with the settings before and after."""
    before = _shown(dest)
    for key, value in changes.items():
        if key in DESTINATION_FIELDS:
            setattr(dest, key, _blank_is_none(value))
    if dest.active is None:
        dest.active = True
    _check(dest)
    _flush_named(db, dest)
    after = _shown(dest)
    changed = sorted(k for k in after if after[k] != before[k])
    secrets_changed = sorted(k for k in ("bearer_token", "basic_password") if k in changes)
    record(
        db,
        "destination_change",
        actor=actor.name,
        target=f"destination:{dest.id}",
        before={k: before[k] for k in changed},
        after={k: after[k] for k in changed},
        secrets_changed=secrets_changed,
    )
    return dest


def delete_destination(db: Session, dest: Destination, actor: User) -> None:
    """Remove a destination; its deliveries keep its name, and those still waiting end ``failed``
    (audit-logged by the worker). Audit-logged."""
    record(db, "destination_delete", actor=actor.name, target=f"destination:{dest.id}", **_shown(dest))
    db.delete(dest)
    db.flush()


# --- sending ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A destination's settings, read once per attempt: the send itself runs outside any transaction."""

    name: str
    kind: str
    host: str | None
    port: int | None
    called_ae: str | None
    calling_ae: str | None
    url: str | None
    bearer_token: str | None
    basic_user: str | None
    basic_password: str | None

    @classmethod
    def of(cls, dest: Destination) -> Target:
        return cls(**{f: getattr(dest, f) for f in cls.__dataclass_fields__})

    @property
    def where(self) -> str:
        """The destination as named in errors: AE title at host:port, or the URL."""
        return f"{self.called_ae}@{self.host}:{self.port}" if self.kind == "dicom" else str(self.url)


def _ae(target: Target, timeout: float) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=target.calling_ae or DEFAULT_CALLING_AE)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


ASSOCIATE_TRIES = 4
"""Association attempts while each ends at once with no answer at all. A peer that refuses may reset the
connection right after its A-ASSOCIATE-RJ (Orthanc's DICOM layer does), and the reset can discard the answer
before it is read: 14 of 300 refusals by Orthanc came back as a bare abort here. A silent host (a timeout)
is not tried again."""
_AT_ONCE_S = 2.0


def _associate(ae: Any, target: Target) -> Any:
    """An established association with ``target``, or a :class:`DeliveryError` saying why there is none."""
    for _ in range(ASSOCIATE_TRIES):
        start = time.monotonic()
        assoc = ae.associate(target.host, target.port, ae_title=target.called_ae)
        answered = assoc.is_established or assoc.is_rejected or assoc.acceptor.primitive is not None
        if answered or time.monotonic() - start > _AT_ONCE_S:
            break
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        raise DeliveryError(
            f"{target.where} rejected the association ({answer.result_str}, {answer.source_str}: "
            f"{answer.reason_str}); check the called AE title {target.called_ae!r} and that the PACS knows "
            f"covidscan's AE title {target.calling_ae!r}"
        )
    if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        raise DeliveryError(
            f"{target.where} accepted none of the SOP classes offered (SR, Secondary Capture)"
        )
    raise DeliveryError(
        f"no association with {target.where}: nothing answered (connection refused, unreachable or timed "
        "out); check the host and port"
    )


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", None) or ExplicitVRLittleEndian)


def c_store(target: Target, datasets: Sequence[Dataset], timeout: float = TIMEOUT) -> list[str]:
    """Send ``datasets`` with C-STORE on one association; returns their SOP Instance UIDs, or raises a
    :class:`DeliveryError` naming each refused instance and its status."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    ae = _ae(target, timeout)
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), _syntax(ds)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = _associate(ae, target)
    sent, refused = [], []
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for its SOP class
                refused.append(f"{uid}: {exc}")
                continue
            if not status:  # no answer: the DIMSE timeout passed, or the connection was lost
                refused.append(f"{uid}: no answer to C-STORE within {timeout:g} s")
                if not assoc.is_established:
                    break
                continue
            code = int(status.Status)
            if code in STORED:
                sent.append(uid)
            else:
                meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure", "unknown status"))
                comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
                refused.append(f"{uid}: status 0x{code:04X} ({meaning[0]}: {meaning[1]}){comment}")
    finally:
        if assoc.is_established:
            assoc.release()
    if refused:
        raise DeliveryError(
            f"{target.where} stored {len(sent)} of {len(datasets)}; refused " + "; ".join(refused)
        )
    return sent


def _auth(target: Target) -> tuple[dict[str, str], httpx.BasicAuth | None]:
    headers = {"Authorization": f"Bearer {target.bearer_token}"} if target.bearer_token else {}
    basic = httpx.BasicAuth(target.basic_user, target.basic_password) if target.basic_user else None
    return headers, basic


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # Part 10: preamble and file meta, as STOW-RS expects
    return buffer.getvalue()


def _short(text: str) -> str:
    """An answer's body on one line, cut to 300 characters (for errors and the audit log)."""
    return " ".join(text.split())[:300]


def _stow_answer(response: httpx.Response) -> Dataset:
    """The DICOM JSON dataset a STOW-RS server answers with; empty when the body is something else (an
    error page or message of a proxy or of the server itself)."""
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):
        return Dataset()


def _stow_failures(answer: Dataset) -> list[str]:
    """The failed instances of a STOW-RS answer (FailedSOPSequence, with FailureReason)."""
    failed = []
    for item in answer.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason 0x{int(reason or 0):04X}")
    return failed


def stow(target: Target, datasets: Sequence[Dataset], timeout: float = TIMEOUT) -> list[str]:
    """Send ``datasets`` in one STOW-RS request (``POST {url}/studies``, multipart/related
    application/dicom); returns their SOP Instance UIDs, or raises a :class:`DeliveryError` with the HTTP
    status and the instances the server refused.

    httpx rather than dicomweb-client: its errors keep the answer's body and per-instance failure reasons,
    and it is the service's HTTP client already."""
    boundary = secrets.token_hex(16)
    parts = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _encode(ds) + b"\r\n"
        for ds in datasets
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers, basic = _auth(target)
    headers |= {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    url = f"{target.url}/studies"
    try:
        response = httpx.post(url, content=body, headers=headers, auth=basic, timeout=timeout)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"STOW-RS to {url} failed: {exc or type(exc).__name__}") from None
    failed = _stow_failures(_stow_answer(response))
    if response.status_code not in (200, 202) or failed:
        text = "; ".join(failed) if failed else _short(response.text)
        raise DeliveryError(f"STOW-RS to {url} answered HTTP {response.status_code}: {text}")
    return [str(ds.SOPInstanceUID) for ds in datasets]


def send(target: Target, datasets: Sequence[Dataset], timeout: float = TIMEOUT) -> list[str]:
    """Send ``datasets`` to ``target`` by its kind; returns the SOP Instance UIDs it accepted."""
    return (c_store if target.kind == "dicom" else stow)(target, datasets, timeout)


@dataclass(frozen=True)
class CheckResult:
    """Whether a destination answered, and what."""

    ok: bool
    detail: str


def check(target: Target, timeout: float = TIMEOUT) -> CheckResult:
    """Try a destination without sending anything: C-ECHO for DICOM, a QIDO-RS study search
    (``GET {url}/studies?limit=1``) for STOW-RS."""
    if target.kind == "dicom":
        from pynetdicom.sop_class import Verification

        ae = _ae(target, timeout)
        ae.add_requested_context(Verification)
        try:
            assoc = _associate(ae, target)
        except DeliveryError as exc:
            return CheckResult(False, str(exc))
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if status and int(status.Status) == 0:
            return CheckResult(True, f"C-ECHO to {target.where}: success")
        code = f"status 0x{int(status.Status):04X}" if status else f"no answer within {timeout:g} s"
        return CheckResult(False, f"C-ECHO to {target.where}: {code}")
    headers, basic = _auth(target)
    url = f"{target.url}/studies"
    try:
        response = httpx.get(
            url,
            params={"limit": 1},
            headers=headers | {"Accept": "application/dicom+json"},
            auth=basic,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        return CheckResult(False, f"GET {url} failed: {exc or type(exc).__name__}")
    if response.status_code in (200, 204):
        return CheckResult(True, f"GET {url}: HTTP {response.status_code}")
    return CheckResult(False, f"GET {url} answered HTTP {response.status_code}: {_short(response.text)}")


def check_destination(db: Session, dest: Destination, actor: User, timeout: float = TIMEOUT) -> CheckResult:
    """:func:`check` a destination (the caller's transaction is committed first: the check may take
    ``timeout`` seconds); audit-logged."""
    target = Target.of(dest)
    db.commit()  # no transaction (SQLite: no write lock) is held while the PACS answers
    result = check(target, timeout)
    record(
        db,
        "destination_check",
        actor=actor.name,
        target=f"destination:{dest.id}",
        ok=result.ok,
        detail=result.detail,
    )
    return result


# --- queueing and the sender -----------------------------------------------------------------------------


def queue_deliveries(db: Session, case: Case, review: Review) -> list[Delivery]:
    """One delivery of a just-signed ``review`` per active destination, in the signing transaction; an
    older version still waiting for a destination is superseded (the newer one goes instead)."""
    now = utcnow()
    db.execute(
        update(Delivery)
        .where(Delivery.case_id == case.id, Delivery.review_version < review.version)
        .where(Delivery.state == "queued")
        .values(
            state="superseded",
            last_error=f"version {review.version} was signed before it was sent",
            updated_at=now,
        )
    )
    added = [
        Delivery(
            case_id=case.id,
            review_version=review.version,
            destination_id=dest.id,
            destination_name=dest.name,
            state="queued",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        for dest in db.scalars(select(Destination).where(Destination.active).order_by(Destination.id))
    ]
    db.add_all(added)
    return added


def signed_version(db: Session, case_id: int) -> int | None:
    """The newest signed version of a case's verdict."""
    return db.scalar(
        select(func.max(Review.version)).where(Review.case_id == case_id, Review.signed_at.is_not(None))
    )


class Sender:
    """Claims due deliveries and sends them; ``stale_owners`` names the owners on this host whose process
    is gone (:meth:`covidscan.service.worker.Worker._stale_owners`), so their deliveries need not wait for
    the lease."""

    def __init__(
        self,
        db: Database,
        *,
        owner: str,
        stale_owners: Callable[[list[str]], list[str]],
        outputs: Outputs,
        retry_seconds: Sequence[float] = RETRY_SECONDS,
        timeout: float = TIMEOUT,
    ) -> None:
        self.db, self.owner, self.stale_owners = db, owner, stale_owners
        self.outputs = outputs
        self.retry_seconds, self.timeout = tuple(retry_seconds), timeout

    @property
    def max_attempts(self) -> int:
        """Attempts before a delivery ends ``failed``: the first and one after each wait."""
        return len(self.retry_seconds) + 1

    def claim(self, now: datetime | None = None) -> int | None:
        """Take one due delivery (oldest first); returns its id, or None. Deliveries to a deactivated
        destination wait until it is active again."""
        now = now or utcnow()
        with self.db.session() as s:
            sending = list(s.scalars(select(Delivery.owner).where(Delivery.state == "sending").distinct()))
            reachable = or_(
                Delivery.destination_id.is_(None),  # deleted: claimed only to end failed
                Delivery.destination_id.in_(select(Destination.id).where(Destination.active)),
            )
            takeable = and_(
                reachable,
                or_(
                    and_(Delivery.state == "queued", Delivery.next_attempt_at <= now),
                    and_(
                        Delivery.state == "sending",
                        or_(Delivery.lease_until < now, Delivery.owner.in_(self.stale_owners(sending))),
                    ),
                ),
            )
            for delivery_id in s.scalars(select(Delivery.id).where(takeable).order_by(Delivery.id).limit(5)):
                # The WHERE repeats the condition: of two workers racing for a delivery, one updates 1 row.
                won = s.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id, takeable)
                    .values(
                        state="sending",
                        owner=self.owner,
                        lease_until=now + LEASE,
                        attempts=Delivery.attempts + 1,
                        updated_at=now,
                    )
                )
                if won.rowcount == 1:
                    return delivery_id
        return None

    def process(self, delivery_id: int, now: datetime | None = None) -> None:
        """Build and send a claimed delivery's outputs; store the outcome while still its owner."""
        with self.db.session() as s:
            delivery = s.get(Delivery, delivery_id)
            if delivery.owner != self.owner or delivery.state != "sending":
                return  # taken over while this worker was away (its lease ran out): never sent twice
            case_id, version = delivery.case_id, delivery.review_version
            target = Target.of(delivery.destination) if delivery.destination else None
            datasets: list[Dataset] = []
            error = None
            newer = signed_version(s, case_id) != version
            if newer or target is None:
                error = (
                    "superseded: a newer version was signed before this one was sent"
                    if newer
                    else "the destination was deleted before this was sent"
                )
            else:
                try:
                    datasets = self.outputs(s, case_id)
                except Exception as exc:  # a case whose records cannot be built must not stall the queue
                    log.exception("case %d: building the DICOM outputs failed", case_id)
                    error = f"the DICOM outputs could not be built: {exc}"
        if newer:
            self._finish(delivery_id, None, error, now, superseded=True)
            return
        uids = None
        if error is None and target is not None:
            try:
                uids = send(target, datasets, self.timeout)
            except DeliveryError as exc:
                error = str(exc)
            except Exception as exc:  # a network library's surprise is one failed attempt, not a dead worker
                log.exception("delivery %d to %s failed unexpectedly", delivery_id, target.where)
                error = f"sending failed: {type(exc).__name__}: {exc}"
        final = target is None
        self._finish(
            delivery_id, uids, error, now, give_up=final, tried=[str(ds.SOPInstanceUID) for ds in datasets]
        )

    def _finish(
        self,
        delivery_id: int,
        uids: list[str] | None,
        error: str | None,
        now: datetime | None,
        *,
        give_up: bool = False,
        superseded: bool = False,
        tried: list[str] | None = None,
    ) -> None:
        now = now or utcnow()
        with self.db.session() as s:
            delivery = s.scalar(select(Delivery).where(Delivery.id == delivery_id).with_for_update())
            if delivery.owner != self.owner or delivery.state != "sending":
                return  # another worker took over after our lease ran out; its outcome counts
            delivery.updated_at, delivery.lease_until = now, None
            case = f"case:{delivery.case_id}"
            if superseded:
                delivery.state, delivery.last_error = "superseded", error
                return
            if error is None:
                delivery.state, delivery.sent_uids, delivery.sent_at, delivery.last_error = (
                    "sent",
                    uids,
                    now,
                    None,
                )
                record(
                    s,
                    "delivery_sent",
                    actor=None,
                    target=case,
                    destination=delivery.destination_name,
                    version=delivery.review_version,
                    attempts=delivery.attempts,
                    sop_instance_uids=uids,
                )
                return
            delivery.last_error = error
            if give_up or delivery.attempts >= self.max_attempts:
                delivery.state = "failed"
                record(
                    s,
                    "delivery_failed",
                    actor=None,
                    target=case,
                    destination=delivery.destination_name,
                    version=delivery.review_version,
                    attempts=delivery.attempts,
                    error=error,
                    sop_instance_uids=tried or [],
                )
            else:
                delivery.state = "queued"
                wait = self.retry_seconds[delivery.attempts - 1]
                delivery.next_attempt_at = now + timedelta(seconds=wait)
                log.warning(
                    "delivery %d (attempt %d) failed, next in %g s: %s",
                    delivery_id,
                    delivery.attempts,
                    wait,
                    error,
                )

    def run_once(self, now: datetime | None = None) -> bool:
        """Claim and send one due delivery; False when none was due."""
        delivery_id = self.claim(now)
        if delivery_id is None:
            return False
        self.process(delivery_id, now)
        return True
