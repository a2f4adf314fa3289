"""The job queue in the database and the worker that empties it.

A worker claims a job with a conditional UPDATE (``state='queued'`` or an expired lease, or a lease held
by a dead process on this host), predicts the case, and writes the result, the case status and
``state='done'`` in one transaction that only commits while it still owns the job. So a killed server
restarted on the same data folder re-runs what was in flight and every case is completed exactly once.

Each case is predicted by its site's run (its own once an admin promoted a challenger, else the active
one); after it, the site's shift test runs again (:func:`covidscan.service.monitoring.after_prediction`). A
second thread trains the challengers sites asked for (:mod:`covidscan.service.adaptation`), one at a time,
so prediction never waits for a training; a challenger whose worker died ends ``failed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import selectinload

from covidscan.errors import ConfigError, CovidscanError
from covidscan.service.audit import record
from covidscan.service.cases import no_result_reason, priority
from covidscan.service.db import Database
from covidscan.service.delivery import RETRY_SECONDS, Sender, default_outputs
from covidscan.service.errors import StorageFull
from covidscan.service.models import Case, CaseImage, DicomPending, Job, Setting, SiteRun, utcnow
from covidscan.service.monitoring import after_prediction
from covidscan.service.scoring import ScoredCase, Scorer
from covidscan.service.settings import active_run
from covidscan.service.sites import put_features, run_for_case
from covidscan.service.storage import BlobStore
from covidscan.system import process_alive

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=10)  # a job still "running" after this is taken over by another worker
MAX_ATTEMPTS = 3
MAX_SCORERS = 4  # loaded runs kept (the global one and a few sites' own); the oldest is dropped
HOST = socket.gethostname()
SWEEP_SECONDS = 600  # how often an idle worker looks for orphan files


def set_active_run(db: Database, run_dir: str | Path, *, actor: str | None) -> str:
    """Switch the run in use (checked by loading it first); recorded in the audit log."""
    path = str(Path(run_dir).resolve())
    try:
        Scorer(path)  # refuse a run that cannot be loaded before any worker tries it
    except CovidscanError as exc:
        raise ConfigError(f"cannot switch to run {path}: {exc}") from None
    with db.session() as s:
        row = s.get(Setting, "active_run")
        old = row.value if row else None
        if row is None:
            s.add(Setting(key="active_run", value=path))
        else:
            row.value = path
        if old != path:
            record(s, "model_switch", actor=actor, target="run", old=old, new=path)
    return path


class Worker:
    """Claims and predicts queued cases and trains sites' challengers; each run's Predictor is loaded once."""

    def __init__(
        self,
        db: Database,
        store: BlobStore,
        *,
        poll_seconds: float = 0.5,
        orphan_minutes: float = 15.0,
        delivery_retry_seconds: tuple[float, ...] = RETRY_SECONDS,
    ) -> None:
        self.db, self.store, self.poll_seconds = db, store, poll_seconds
        self.orphan_seconds = orphan_minutes * 60
        self._next_sweep = 0.0  # monotonic time of the next orphan sweep: the first idle moment
        self.owner = f"{HOST}:{os.getpid()}:{secrets.token_hex(4)}"
        # Signed results to the PACS, in a thread of their own: a slow PACS never holds up prediction.
        self.sender = Sender(
            db,
            owner=self.owner,
            stale_owners=self._stale_owners,
            outputs=default_outputs(store),
            retry_seconds=delivery_retry_seconds,
        )
        self._scorers: dict[str, Scorer] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def scorer(self, run: str | None = None) -> Scorer:
        """The loaded model of ``run``, by default the active run (loaded on first use; the least recently
        used dropped past :data:`MAX_SCORERS`)."""
        if run is None:
            with self.db.session() as s:
                run = active_run(s)
        if run is None:
            raise CovidscanError("no run is active; start `covidscan serve --run RUN` or switch the model")
        scorer = self._scorers.pop(run, None) or Scorer(run)
        self._scorers[run] = scorer  # most recently used last
        while len(self._scorers) > MAX_SCORERS:
            self._scorers.pop(next(iter(self._scorers)))
        return scorer

    def _stale_owners(self, owners: list[str]) -> list[str]:
        """Owners on this host whose process is gone (their jobs need not wait for the lease)."""
        stale = []
        for owner in owners:
            host, _, rest = owner.partition(":")
            pid = rest.partition(":")[0]
            if host == HOST and pid.isdigit() and owner != self.owner and not process_alive(int(pid)):
                stale.append(owner)
        return stale

    def claim(self) -> int | None:
        """Take one job (oldest first); returns its case id, or None when there is nothing to do."""
        now = utcnow()
        with self.db.session() as s:
            running = list(s.scalars(select(Job.owner).where(Job.state == "running").distinct()))
            takeable = or_(
                Job.state == "queued",
                and_(
                    Job.state == "running",
                    or_(Job.lease_until < now, Job.owner.in_(self._stale_owners(running))),
                ),
            )
            for job_id in s.scalars(select(Job.id).where(takeable).order_by(Job.id).limit(5)):
                # The WHERE repeats the condition: of two workers racing for a job, one updates 1 row.
                won = s.execute(
                    update(Job)
                    .where(Job.id == job_id, takeable)
                    .values(
                        state="running", owner=self.owner, lease_until=now + LEASE, attempts=Job.attempts + 1
                    )
                )
                if won.rowcount == 1:
                    job = s.get(Job, job_id)
                    s.execute(update(Case).where(Case.id == job.case_id).values(status="running"))
                    return job.case_id
        return None

    def process(self, case_id: int) -> None:
        """Predict a claimed case and store everything in one transaction guarded by job ownership."""
        with self.db.session() as s:
            case = s.scalar(select(Case).where(Case.id == case_id).options(selectinload(Case.images)))
            files = [(self.store.path(im.sha256), im.suffix, im.original_name) for im in case.images]
            run = run_for_case(s, case)
        scorer: Scorer | None = None
        try:
            scorer = self.scorer(run)
            result = scorer.score(files)
            error = None
        except CovidscanError as exc:
            log.warning("case %d failed: %s", case_id, exc)
            result, error = None, str(exc)
        try:
            stored = self._finish(case_id, scorer, result, error)
        except StorageFull as exc:  # a full disk must not leave the case `running` until a restart
            log.warning("case %d failed: %s", case_id, exc)
            stored = self._finish(case_id, None, None, str(exc))
        if stored:
            self.check_site(case_id, scorer)

    def _finish(
        self, case_id: int, scorer: Scorer | None, result: ScoredCase | None, error: str | None
    ) -> bool:
        """Store a case's result (or its failure: queued again, or failed after MAX_ATTEMPTS) in one
        transaction guarded by job ownership; True when the result was stored."""
        with self.db.session() as s:
            job = s.scalar(select(Job).where(Job.case_id == case_id).with_for_update())
            if job.owner != self.owner or job.state != "running":
                return False  # another worker took over after our lease ran out; its result counts
            case = s.scalar(select(Case).where(Case.id == case_id).options(selectinload(Case.images)))
            job.finished_at = case.predicted_at = utcnow()
            if result is None:
                final = job.attempts >= MAX_ATTEMPTS
                job.state = "failed" if final else "queued"
                case.status, case.error = ("failed" if final else "queued"), error
                return False
            for im, scored in zip(case.images, result.images, strict=True):
                im.p_covid, im.label, im.uncertain = scored.p_covid, scored.label, scored.uncertain
                im.lungs_found, im.warnings, im.error = scored.lungs_found, scored.warnings, scored.error
                im.group_id = scored.group_id
                im.cam_sha256 = self.store.put(scored.cam_png) if scored.cam_png else None
                features = scored.features
                im.features_sha256 = None if features is None else put_features(self.store, features)
            case.model, case.group, case.run = scorer.identity, result.group, str(scorer.run_dir)
            case.priority = priority(any(im.uncertain for im in case.images), result.group)
            if result.group is None:  # every image unreadable or refused: say so, never "ready"
                case.status, case.error = "no_result", no_result_reason(case.images)
            else:
                case.status, case.error = "ready", None
            job.state = "done"
            record(
                s,
                "prediction",
                actor=None,
                target=f"case:{case_id}",
                run=scorer.identity["run"],
                p_covid=None if result.group is None else round(result.group["p_covid"], 6),
            )
        return True

    def check_site(self, case_id: int, scorer: Scorer) -> None:
        """Run the case's site's shift test again (it has one more image) and refresh its figures when
        due; a run without a usable shift reference is logged, not fatal: prediction goes on without the
        alarm."""
        try:
            reference = scorer.reference()
        except CovidscanError:  # the scorer logged why, once
            reference = None
        with self.db.session() as s:
            case = s.get(Case, case_id)
            after_prediction(s, self.store, case.site, str(scorer.run_dir), reference)

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue was empty."""
        case_id = self.claim()
        if case_id is None:
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_SECONDS
                self.sweep_orphans()
            return False
        self.process(case_id)
        return True

    def sweep_orphans(self) -> int:
        """Remove stored files no case refers to and older than ``orphan_minutes`` (left by uploads
        interrupted before their case was committed); returns how many. The files of DICOM instances
        waiting for the rest of their series are kept too."""
        columns = (CaseImage.sha256, CaseImage.display_sha256, CaseImage.cam_sha256,
                   CaseImage.features_sha256, DicomPending.sha256)
        with self.db.session() as s:
            referenced = {d for col in columns for d in s.scalars(select(col).where(col.is_not(None)))}
        removed = self.store.sweep(referenced, older_than=self.orphan_seconds)
        if removed:
            log.info("removed %d orphan file(s) from %s", removed, self.store.root)
        return removed

    def claim_challenger(self) -> tuple[int, Path] | None:
        """Take the oldest challenger waiting to be trained; returns its id and run folder.

        A challenger whose worker died (a crash, or a restart mid-training) ends ``failed`` with the
        reason instead of being trained again, so a training that kills its worker cannot loop; an admin
        asks for a new one.
        """
        with self.db.session() as s:
            waiting = select(SiteRun).where(SiteRun.state == "training").order_by(SiteRun.id)
            training = s.scalars(waiting).all()
            for orphan in [r for r in training if r.owner and self._stale_owners([r.owner])]:
                error = f"the worker training it ({orphan.owner}) stopped before it finished; ask again"
                s.execute(
                    update(SiteRun)
                    .where(SiteRun.id == orphan.id, SiteRun.owner == orphan.owner)
                    .where(SiteRun.state == "training")
                    .values(state="failed", error=error)
                )
                record(s, "challenger_trained", actor=None, target=f"site:{orphan.site_id}",
                       site_run=orphan.id, state="failed", better=None, error=error)
            for site_run in [r for r in training if r.owner is None]:
                out = self.store.root.parent / "site-runs" / f"site-{site_run.site_id}-{site_run.id}"
                won = s.execute(
                    update(SiteRun)  # the WHERE repeats the condition: of two workers, one wins
                    .where(SiteRun.id == site_run.id, SiteRun.state == "training", SiteRun.owner.is_(None))
                    .values(run=str(out), owner=self.owner)
                )
                if won.rowcount == 1:
                    return site_run.id, out
        return None

    def train_once(self) -> bool:
        """Train one waiting challenger; False when there was none."""
        claimed = self.claim_challenger()
        if claimed is None:
            return False
        from covidscan.service.adaptation import train_challenger  # the training code, only when needed

        # A training shares the CPU with prediction and the requests: on a 2-core server it ran at their
        # priority and a case page took over 5 s to answer, so this thread yields to them (Linux: a thread
        # is a task with its own niceness; adapt trains on one torch thread, this one).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        train_challenger(self.db, self.store, *claimed)
        return True

    def wake(self) -> None:
        """Tell a sleeping worker thread that a job was queued."""
        self._wake.set()

    def loop(self, step=None) -> None:
        """Work until :meth:`stop` (``step``: :meth:`run_once`, :meth:`train_once` for the training
        thread, or the sender's for deliveries); sleeps ``poll_seconds`` (or until woken) when there is
        nothing to do."""
        step = step or self.run_once
        while not self._stop.is_set():
            try:
                busy = step()
            except Exception:  # keep the worker alive: a database hiccup must not stop prediction
                log.exception("worker %s: job failed unexpectedly", self.owner)
                busy = False
            if not busy:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def start(self) -> None:
        """Run :meth:`loop` for predictions, challengers and deliveries to PACS, each in a daemon thread."""
        steps = (
            ("covidscan-worker", self.run_once),
            ("covidscan-adapt", self.train_once),
            ("covidscan-delivery", self.sender.run_once),
        )
        for name, step in steps:
            thread = threading.Thread(target=self.loop, args=(step,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads after their current job (a training cut short ends ``failed`` at the next
        start)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=60)
