"""The DICOM listener: a C-STORE and C-ECHO SCP (pynetdicom) that turns each series a PACS or modality
pushes into one case.

Each received instance is checked at once (:func:`covidscan.service.dicom_in.check_instance`): a bad one
gets a failure status naming why (and a log line) and leaves nothing behind. A good one is written to the
file store and a :class:`~covidscan.service.models.DicomPending` row before the success status goes back,
so an instance acknowledged is never lost. Once no instance of a series arrived for ``quiet_seconds``, its
rows become one case (patient from PatientID, site from the calling AE title, then InstitutionName) in the
transaction that deletes them: a crash leaves either the pending rows or the case, never both or neither,
and pending rows left by a stopped server become cases after its next start.

Cases belong to the submitter account ``dicom`` (:data:`covidscan.service.dicom_in.DICOM_ACCOUNT`).
Associations must call the listener's own AE title; every storage SOP class is accepted in every transfer
syntax, so an instance in one that cannot be decoded here gets 0xC122 naming it rather than a rejected
association.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from covidscan.errors import ConfigError, CovidscanError
from covidscan.service.db import Database
from covidscan.service.dicom_in import (
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    Instance,
    InstanceRefused,
    check_instance,
    create_series_case,
    dicom_account,
    served_modality,
)
from covidscan.service.errors import StorageFull
from covidscan.service.models import DicomPending, utcnow
from covidscan.service.storage import BlobStore

log = logging.getLogger(__name__)

SUCCESS = 0x0000
RETRY_SECONDS = 60.0  # a series whose case could not be made (full disk, account off) is tried again after


class DicomListener:
    """C-STORE/C-ECHO SCP on ``host:port`` called ``ae_title``; ``start()`` binds and returns (the server
    runs in threads), ``port`` is the port bound (``port=0`` picks a free one), ``stop()`` ends it.

    ``on_case`` is called (no arguments) after each case is committed, e.g. to wake the worker.
    """

    def __init__(
        self,
        db: Database,
        store: BlobStore,
        *,
        host: str = "127.0.0.1",
        port: int = 11112,
        ae_title: str = "COVIDSCAN",
        quiet_seconds: float = 10.0,
        max_pixels: int,
        on_case: Callable[[], None] | None = None,
    ) -> None:
        self.db, self.store = db, store
        self.host, self.ae_title, self.quiet_seconds = host, ae_title, quiet_seconds
        self.max_pixels, self.on_case = max_pixels, on_case
        self._requested_port = port
        self._server: ThreadedAssociationServer | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._retry_after: dict[str, float] = {}  # series UID -> monotonic time of its next try

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to (after ``start()``)."""
        if self._server is None:
            raise CovidscanError("the DICOM listener is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads; pending instances left by an earlier run become cases
        once quiet. A port that cannot be bound is a :class:`ConfigError`."""
        # pynetdicom logs every request at INFO: a line per slice; refusals and cases are logged here.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # an association addressed to another AE title was meant elsewhere
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        try:
            self._server = ae.start_server(
                (self.host, self._requested_port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for DICOM on {self.host}:{self._requested_port} ({exc.strerror}); "
                "choose another --dicom-port"
            ) from None
        self._stop.clear()
        self._flusher = threading.Thread(target=self._flush_loop, name="dicom-series", daemon=True)
        self._flusher.start()
        log.info("DICOM listener %s on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        """Stop accepting associations and making cases; instances still pending stay for the next start."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._flusher is not None:
            self._flusher.join(timeout=60)
            self._flusher = None

    # ------------------------------------------------------------------ receiving
    def _on_echo(self, _event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset | int:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
        try:
            self._keep(event.encoded_dataset(include_meta=True), calling)
        except InstanceRefused as exc:
            return self._failure(calling, sop, exc.status, exc.reason)
        except StorageFull as exc:
            return self._failure(calling, sop, OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # a bug or a database fault: the sender must not think it was stored
            log.exception("DICOM C-STORE from %s: instance %s failed", calling, sop)
            return self._failure(calling, sop, PROCESSING_FAILURE, f"{type(exc).__name__}: {exc}")
        return SUCCESS

    @staticmethod
    def _failure(calling: str, sop: str, status: int, reason: str) -> Dataset:
        log.warning(
            "DICOM C-STORE from %s: instance %s refused (status 0x%04X): %s", calling, sop, status, reason
        )
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = reason[:64]  # LO: at most 64 characters; the log has the whole reason
        return answer

    def _keep(self, data: bytes, calling: str) -> None:
        """Check the instance, store its file, then its pending row (the same SOP instance sent again
        before its series became a case replaces the earlier copy)."""
        with self.db.session() as s:
            dicom_account(s)  # refused while the account is off: nothing is stored then
            modality = served_modality(s)
        instance = check_instance(data, modality=modality, max_pixels=self.max_pixels)
        digest = self.store.put(data)
        row = {
            "study_uid": instance.study_uid[:64],
            "series_uid": instance.series_uid[:64],
            "sha256": digest,
            "calling_ae": calling[:16],
            "received_at": utcnow(),
        }
        try:
            with self.db.session() as s:
                held = s.scalar(select(DicomPending).where(DicomPending.sop_uid == instance.sop_uid[:64]))
                if held is None:
                    s.add(DicomPending(sop_uid=instance.sop_uid[:64], **row))
                else:
                    for key, value in row.items():
                        setattr(held, key, value)
        except IntegrityError:
            log.info("DICOM instance %s arrived twice at once; one copy is kept", instance.sop_uid)

    # ------------------------------------------------------------------ series -> cases
    def _flush_loop(self) -> None:
        interval = min(1.0, self.quiet_seconds / 4)
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # keep the listener's cases coming: the next round tries again
                log.exception("making cases of received DICOM series failed")

    def flush(self) -> list[int]:
        """Make a case of every pending series that has been quiet for ``quiet_seconds``; returns the
        new cases' ids."""
        quiet_since = utcnow() - timedelta(seconds=self.quiet_seconds)
        with self.db.session() as s:
            quiet = list(
                s.scalars(
                    select(DicomPending.series_uid)
                    .group_by(DicomPending.series_uid)
                    .having(func.max(DicomPending.received_at) < quiet_since)
                )
            )
        made = []
        for series in quiet:
            if self._retry_after.get(series, 0.0) > time.monotonic():
                continue
            try:
                case_id = self._series_case(series)
            except (InstanceRefused, StorageFull) as exc:
                log.warning(
                    "DICOM series %s: no case yet, tried again in %d s: %s", series, RETRY_SECONDS, exc
                )
                self._retry_after[series] = time.monotonic() + RETRY_SECONDS
                continue
            self._retry_after.pop(series, None)
            if case_id is not None:
                made.append(case_id)
                if self.on_case is not None:
                    self.on_case()
        return made

    def _series_case(self, series: str) -> int | None:
        """The case of one quiet series, or None when it changed meanwhile (more instances arrived, or
        another process took it): then it is looked at again in the next round."""
        with self.db.session() as s:
            rows = [
                (r.id, r.sha256, r.calling_ae)
                for r in s.scalars(
                    select(DicomPending).where(DicomPending.series_uid == series).order_by(DicomPending.id)
                )
            ]
        # Decoded outside any transaction (SQLite would hold its write lock meanwhile); they passed the
        # check on arrival, so a switch of the run's modality since does not refuse them now.
        instances: list[Instance] = []
        for row_id, digest, _ in rows:
            try:
                instances.append(
                    check_instance(self.store.read(digest), modality=None, max_pixels=self.max_pixels)
                )
            except CovidscanError as exc:  # InstanceRefused too
                log.error(
                    "DICOM series %s: a received instance is unreadable now and left out: %s", series, exc
                )
                with self.db.session() as s:
                    s.execute(delete(DicomPending).where(DicomPending.id == row_id))
                return None
        ids = {row_id for row_id, _, _ in rows}
        senders = [ae for _, _, ae in rows]
        with self.db.session() as s:
            now_held = set(
                s.scalars(select(DicomPending.id).where(DicomPending.series_uid == series).with_for_update())
            )
            if now_held != ids or not ids:
                return None
            user = dicom_account(s)
            case = create_series_case(
                s, self.store, user, instances, sender_ae=max(set(senders), key=senders.count)
            )
            s.execute(delete(DicomPending).where(DicomPending.id.in_(ids)))
            s.flush()
            case_id = case.id
        log.info("DICOM series %s (%d instances) from %s is case %d", series, len(ids), senders[0], case_id)
        return case_id
