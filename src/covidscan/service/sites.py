"""Sites: where images come from, and what the service knows about the model there.

A case's site is the sender's ``site`` name, else the DICOM InstitutionName / StationName, else the
submitter account's name (:func:`resolve_site`). Admins rename and merge sites, set their validation rules,
force reader-first on or off and give a site its own run (the champion). Doctors' reader-first findings
(:class:`~covidscan.service.models.FirstRead`) are kept apart from their verdicts. The signed cases of a
site (:func:`signed_site_cases`) are the input of its local validation; its verdicts as an ``adapt``
manifest (:func:`site_verdicts_manifest`) the input of a challenger.

Names are matched case-insensitively (``St Mary`` and ``ST MARY`` are one site) and a merged site's name
resolves to the site it was merged into, so images from it keep landing in the right place.
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError
from covidscan.evaluation.site import SiteRules
from covidscan.service.audit import record
from covidscan.service.cases import export_verdicts, signed_latest
from covidscan.service.errors import Conflict, ErrorCode, NotAllowed
from covidscan.service.models import (
    FINDINGS,
    SITE_STATUSES,
    Case,
    CaseImage,
    FirstRead,
    Site,
    SiteRun,
    SiteShiftCheck,
    User,
    utcnow,
)
from covidscan.service.scoring import SITE_TAGS
from covidscan.service.settings import active_run
from covidscan.service.storage import BlobStore

SITE_NAME_MAX = 128  # the column's width; DICOM's InstitutionName (LO) is at most 64
# The rules a site is validated by, when its admin set none. The sensitivity and specificity targets are
# lower bounds of the patient-bootstrap 95% CIs; 0.70 is reachable from 50 signed patients by a model whose
# true figures are about 0.9, and not by one at chance.


def normalise_site_name(raw: str, *, what: str = "site name") -> str:
    """``raw`` stripped, inner whitespace runs made one space; refuses empty, over-long and control-character
    names with a :class:`ConfigError` that names ``what`` (the field the name came from)."""
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in raw):
        raise ConfigError(f"{what} {raw!r} contains control characters; use printable text only")
    name = " ".join(raw.split())
    if not name:
        raise ConfigError(f"{what} is empty; give a name such as the hospital or scanner")
    if len(name) > SITE_NAME_MAX:
        raise ConfigError(f"{what} is {len(name)} characters long; at most {SITE_NAME_MAX} are allowed")
    return name


def _named(db: Session, name: str) -> Site | None:
    """The site called ``name`` in any letter case (its exact spelling first), not following merges."""
    query = (
        select(Site)
        .where(func.lower(Site.name) == name.lower())
        .order_by((Site.name == name).desc(), Site.id)
        .limit(1)
    )
    return db.scalar(query)


def _live(site: Site) -> Site:
    """The site that holds ``site``'s cases: itself, or the one it was merged into."""
    seen = {site.id}
    while site.merged_into is not None and site.merged_into.id not in seen:
        site = site.merged_into
        seen.add(site.id)
    return site


def find_site(db: Session, name: str) -> Site | None:
    """The site called ``name`` (any letter case), or the one it was merged into; None when unknown."""
    site = _named(db, " ".join(name.split()))
    return _live(site) if site is not None else None


def _site_called(db: Session, name: str, actor: str) -> Site:
    """The live site called ``name``, created when new (a concurrent creation of the same name is found);
    ``actor`` is who caused the creation, for the audit log."""
    site = find_site(db, name)
    if site is not None:
        return site
    try:
        with db.begin_nested():  # a savepoint: a concurrent insert of the same name only undoes this one
            site = Site(name=name)
            db.add(site)
            db.flush()
    except IntegrityError:
        site = find_site(db, name)
        if site is None:
            raise
        return site
    record(db, "site_created", actor=actor, target=f"site:{site.id}", name=name)
    return site


def resolve_site(
    db: Session, *, explicit: str | None, submitter: User, dicom: dict | None, sender_ae: str | None = None
) -> Site:
    """The site of a new case: ``explicit`` (the sender's ``site``) > ``sender_ae`` (the calling AE title
    of the DICOM association it came by) > the DICOM InstitutionName > StationName > the submitter
    account's name; created on first use.

    A bad explicit name is refused (:class:`ConfigError`); an unusable AE title or DICOM value (empty,
    control characters) is passed over for the next source, since the sender did not type it as a site.
    """
    if explicit is not None and explicit.strip():
        return _site_called(db, normalise_site_name(explicit, what="site"), submitter.name)
    sources = {"calling AE title": sender_ae, **{tag: (dicom or {}).get(tag) for tag in SITE_TAGS}}
    for tag, raw in sources.items():
        value = str(raw or "").strip(" \x00")  # DICOM pads values with spaces or NULs
        if value:
            try:
                name = normalise_site_name(value[:SITE_NAME_MAX], what=tag)
            except ConfigError:
                continue
            return _site_called(db, name, submitter.name)
    return _site_called(db, submitter.name, submitter.name)


def get_site(db: Session, site_id: int) -> Site | None:
    """The site with this id (merged ones too), or None."""
    return db.get(Site, site_id)


@dataclass(frozen=True)
class SiteSummary:
    """A site with its number of cases and of signed cases (for listings)."""

    site: Site
    n_cases: int
    n_signed: int


def list_sites(db: Session, *, include_merged: bool = False) -> list[SiteSummary]:
    """Every site by name with its case counts; merged sites (which hold no cases) only when asked."""
    counts = {
        site_id: (n, signed)
        for site_id, n, signed in db.execute(
            select(
                Case.site_id,
                func.count(Case.id),
                func.count(Case.id).filter(Case.status == "signed"),
            ).group_by(Case.site_id)
        )
    }
    query = select(Site).order_by(Site.name)
    if not include_merged:
        query = query.where(Site.merged_into_id.is_(None))
    return [SiteSummary(s, *counts.get(s.id, (0, 0))) for s in db.scalars(query)]


def _require_admin(actor: User, what: str) -> None:
    if actor.role != "admin":
        raise NotAllowed(f"only admins {what}; {actor.name} is {actor.role}")


def _require_live(site: Site) -> None:
    if site.merged_into_id is not None:
        raise Conflict(
            f"site {site.name!r} was merged into {_live(site).name!r}; change that site instead",
            ErrorCode.SITE_MERGED,
        )


def rename_site(db: Session, site: Site, new_name: str, actor: User) -> Site:
    """Give ``site`` a new name (normalised as in :func:`normalise_site_name`); admins only, audit-logged.

    A name another site holds (in any letter case, merged sites included) is a :class:`Conflict`: merge
    the two instead.
    """
    _require_admin(actor, "rename sites")
    _require_live(site)
    name = normalise_site_name(new_name)
    holder = _named(db, name)
    if holder is not None and holder.id != site.id:
        raise Conflict(
            f"site name {name!r} is taken by site {holder.id}; merge the sites instead",
            ErrorCode.SITE_NAME_TAKEN,
        )
    old, site.name = site.name, name
    db.flush()
    record(db, "site_rename", actor=actor.name, target=f"site:{site.id}", old=old, new=name)
    return site


def merge_sites(db: Session, source: Site, target: Site, actor: User) -> int:
    """Move every case of ``source`` to ``target`` and mark ``source`` merged into it; returns the number
    of cases moved. Admins only, audit-logged.

    ``source`` keeps its row and name, so later images named after it land in ``target``; sites merged
    into ``source`` earlier now point at ``target``. ``target``'s cached local figures and shift result
    are cleared: they no longer describe its cases (the worker recomputes them).
    """
    _require_admin(actor, "merge sites")
    if source.id == target.id:
        raise Conflict(f"cannot merge site {source.name!r} into itself", ErrorCode.SITE_MERGED)
    _require_live(source)
    _require_live(target)
    moved = db.execute(update(Case).where(Case.site_id == source.id).values(site_id=target.id)).rowcount
    db.execute(update(Site).where(Site.merged_into_id == source.id).values(merged_into_id=target.id))
    source.merged_into_id = target.id
    target.local = target.shift = None
    db.flush()
    db.expire_all()  # the bulk updates bypassed the loaded objects (cases' site, merged sites' links)
    record(
        db,
        "site_merge",
        actor=actor.name,
        target=f"site:{source.id}",
        source=source.name,
        into=target.name,
        into_id=target.id,
        cases=moved,
    )
    return moved


def site_rules(site: Site) -> SiteRules:
    """The rules ``site`` is validated by: the admin's, each missing one at its default."""
    return SiteRules(**(site.rules or {}))


def set_rules(db: Session, site: Site, rules: dict[str, Any] | None, actor: User) -> SiteRules:
    """Set some or all of ``site``'s validation rules (``None``: back to the defaults); admins only,
    audit-logged. Unknown keys and out-of-range values are refused with a :class:`ConfigError`. Returns
    the rules now in force."""
    _require_admin(actor, "set validation rules")
    _require_live(site)
    try:
        checked = SiteRules(**(rules or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rules'}: {e['msg']}" for e in exc.errors())
        names = ", ".join(SiteRules.model_fields)
        raise ConfigError(f"site rules refused ({problems}); the rules are {names}") from None
    site.rules = checked.model_dump(include=set(rules or ())) or None
    db.flush()
    record(db, "site_rules", actor=actor.name, target=f"site:{site.id}", rules=site.rules)
    return checked


def reader_first_applies(site: Site) -> bool:
    """Whether doctors read ``site``'s cases before seeing the model: the admin's choice when set, else
    reader-first unless the site is validated."""
    return site.reader_first if site.reader_first is not None else site.status != "validated"


def set_reader_first(db: Session, site: Site, value: bool | None, actor: User) -> None:
    """Force reader-first on (True) or off (False) for ``site``, or back to the default rule (None);
    admins only, audit-logged."""
    _require_admin(actor, "change reader-first")
    _require_live(site)
    old, site.reader_first = site.reader_first, value
    db.flush()
    record(db, "site_reader_first", actor=actor.name, target=f"site:{site.id}", old=old, new=value)


def set_status(db: Session, site: Site, status: str, *, actor: str | None = None, **why: Any) -> bool:
    """Move ``site`` to ``status`` (one of SITE_STATUSES); audit-logged with ``why`` when it changes.
    Returns whether it changed (``status_since`` only moves then)."""
    if status not in SITE_STATUSES:
        raise ConfigError(f"site status must be one of {', '.join(SITE_STATUSES)}, got {status!r}")
    if site.status == status:
        return False
    old, site.status, site.status_since = site.status, status, utcnow()
    db.flush()
    record(db, "site_status", actor=actor, target=f"site:{site.id}", old=old, new=status, **why)
    return True


def record_first_read(db: Session, case: Case, reader: User, finding: str) -> FirstRead:
    """Keep ``reader``'s finding on ``case`` made before the model's result was shown; doctors only,
    once per reader and case, audit-logged.

    Refused (:class:`Conflict`) once the reader has a first read or a verdict on the case (they have seen
    the model by then), when the case is signed, and when its prediction failed.
    """
    if reader.role != "doctor":
        raise NotAllowed(f"only doctors read cases; {reader.name} is {reader.role}")
    if finding not in FINDINGS:
        raise ConfigError(f"finding must be one of {', '.join(FINDINGS)}, got {finding!r}")
    if case.status in ("signed", "failed"):
        raise Conflict(
            f"case {case.id} is {case.status}: a first read is only taken before the verdict",
            ErrorCode.FIRST_READ_REFUSED,
        )
    if first_read_for(db, case, reader) is not None:
        raise Conflict(
            f"{reader.name} already recorded a first read of case {case.id}; it cannot change",
            ErrorCode.FIRST_READ_REFUSED,
        )
    if any(r.reviewer_id == reader.id for r in case.reviews):
        raise Conflict(
            f"{reader.name} already has a verdict on case {case.id}: a first read comes before it",
            ErrorCode.FIRST_READ_REFUSED,
        )
    first = FirstRead(case_id=case.id, reader_id=reader.id, finding=finding)
    db.add(first)
    db.flush()
    record(db, "first_read", actor=reader.name, target=f"case:{case.id}", finding=finding)
    return first


def first_read_for(db: Session, case: Case, reader: User) -> FirstRead | None:
    """``reader``'s first read of ``case``, or None."""
    return db.scalar(select(FirstRead).where(FirstRead.case_id == case.id, FirstRead.reader_id == reader.id))


def set_site_run(db: Session, site: Site, run: str | Path | None, actor: User) -> str | None:
    """Serve ``site`` with ``run`` (a run directory; None: the service's global run); admins only,
    audit-logged. Returns the resolved path.

    The caller checks the run loads (as the worker's switch does) before calling. The switch restarts
    local validation (``run_since``), clears the cached figures and shift result, and a validated or
    degraded site goes back to validating: the new run has proved nothing there yet.
    """
    _require_admin(actor, "choose a site's run")
    _require_live(site)
    path = None if run is None else str(Path(run).resolve())
    if path is not None and not Path(path).is_dir():
        raise ConfigError(f"run {path} is not a directory; give the run folder that `covidscan train` made")
    old = site.active_run
    site.active_run, site.run_since = path, utcnow()
    site.local = site.shift = None
    db.flush()
    record(db, "site_run", actor=actor.name, target=f"site:{site.id}", old=old, new=path)
    if site.status in ("validated", "degraded"):
        set_status(db, site, "validating", actor=actor.name, reason="run switched")
    return path


def run_for_case(db: Session, case: Case) -> str | None:
    """The run that predicts ``case``: its site's own, else the service's active run (None if neither)."""
    return case.site.active_run or active_run(db)


@dataclass(frozen=True)
class SignedCase:
    """One signed case of a site as local validation sees it (one row per case, i.e. patient or series)."""

    case_id: int
    patient_id: str  # the case's, else ``case-N``
    run: str | None  # the run that predicted it
    p_covid: float  # the model's case-level probability
    threshold: float | None  # the case-level threshold it was labelled with
    predicted: int  # the model's label: 1 covid, 0 not
    label: int  # the signed finding: 1 covid, 0 non_covid
    signed_at: datetime  # when the case was first signed (an amendment does not move it)
    agree: bool  # the doctor's agreement with the model, in the newest signed verdict
    first_read: str | None  # the signer's reader-first finding, when one was recorded


def signed_site_cases(db: Session, site: Site, since: datetime | None = None) -> list[SignedCase]:
    """The signed cases of ``site`` with the model's probability, in order of first signature.

    With ``since`` (e.g. ``site.run_since``), only cases predicted at or after it. Indeterminate verdicts
    and cases without a case-level prediction are left out (they have no label to score).
    """
    pairs = [
        (case, review)
        for case, review in signed_latest(db, site=site, since=since)
        if review.finding != "indeterminate" and case.group is not None
    ]
    firsts = {
        (f.case_id, f.reader_id): f.finding
        for f in db.scalars(select(FirstRead).where(FirstRead.case_id.in_([c.id for c, _ in pairs])))
    }
    rows = [
        SignedCase(
            case_id=case.id,
            patient_id=case.patient_id or f"case-{case.id}",
            run=case.run,
            p_covid=float(case.group["p_covid"]),
            threshold=case.group.get("threshold"),
            predicted=int(case.group["label"] == "covid"),
            label=int(review.finding == "covid"),
            signed_at=min(r.signed_at for r in case.reviews if r.signed_at is not None),
            agree=review.agree,
            first_read=firsts.get((case.id, review.reviewer_id)),
        )
        for case, review in pairs
    ]
    return sorted(rows, key=lambda r: (r.signed_at, r.case_id))


def site_verdicts_manifest(
    db: Session, store: BlobStore, site: Site, *, since: datetime | None = None
) -> str:
    """``site``'s signed verdicts as the manifest ``covidscan adapt`` reads (see
    :func:`covidscan.service.cases.export_verdicts`); ``since`` as in :func:`signed_site_cases`."""
    return export_verdicts(db, store, site=site, since=since)


def record_shift_check(
    db: Session,
    site: Site,
    *,
    run: str,
    n_images: int,
    auc: float | None,
    p_value: float | None,
    alarm: bool,
    details: dict[str, Any] | None = None,
) -> SiteShiftCheck:
    """Add a shift test of ``site`` against ``run`` to its history and make it the site's cached result."""
    check = SiteShiftCheck(
        site_id=site.id, run=run, n_images=n_images, auc=auc, p_value=p_value, alarm=alarm, details=details
    )
    db.add(check)
    db.flush()
    site.shift = {
        "run": run,
        "computed_at": check.computed_at.isoformat(),
        "n_images": n_images,
        "auc": auc,
        "p_value": p_value,
        "alarm": alarm,
        "details": details,
    }
    return check


def put_features(store: BlobStore, vector: np.ndarray) -> str:
    """Store an image's pooled feature vector as a float32 ``.npy`` blob; returns its digest (the value of
    ``CaseImage.features_sha256``)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float32).reshape(-1), allow_pickle=False)
    return store.put(buf.getvalue())


def read_features(store: BlobStore, sha256: str) -> np.ndarray:
    """A feature vector stored by :func:`put_features`."""
    return np.load(io.BytesIO(store.read(sha256)), allow_pickle=False)


def site_features(
    db: Session,
    store: BlobStore,
    site: Site,
    *,
    run: str | None = None,
    since: datetime | None = None,
    last: int | None = None,
) -> np.ndarray:
    """The stored feature vectors of ``site``'s images, one row each (n, d) in case order: the shift
    test's input. ``run`` keeps the images predicted by that run (features differ between runs), ``since``
    those predicted at or after that time, ``last`` the most recent ones only (no more blobs read)."""
    query = (
        select(CaseImage.features_sha256)
        .join(Case, Case.id == CaseImage.case_id)
        .where(Case.site_id == site.id, CaseImage.features_sha256.is_not(None))
        .order_by(Case.id.desc(), CaseImage.position.desc())
        .limit(last)
    )
    if run is not None:
        query = query.where(Case.run == run)
    if since is not None:
        query = query.where(Case.predicted_at >= since)
    vectors = [read_features(store, digest) for digest in reversed(db.scalars(query).all())]
    return np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def _open_run(db: Session, site: Site) -> SiteRun | None:
    """The site's challenger being trained or waiting for a decision, if any."""
    return db.scalar(select(SiteRun).where(SiteRun.site_id == site.id,
                                           SiteRun.state.in_(("training", "candidate"))))


def signed_patients(db: Session, site: Site) -> int:
    """Signed patients of ``site`` since its run began serving it (what ``adapt_min_patients`` counts):
    every covid or non_covid verdict, including cases the run refused to score -- those are what a
    challenger most needs to learn, and the adaptation manifest holds them."""
    return len({case.patient_id or f"case-{case.id}"
                for case, review in signed_latest(db, site=site, since=site.run_since)
                if review.finding != "indeterminate"})


def request_challenger(db: Session, site: Site, actor: User | None) -> SiteRun:
    """Queue a challenger for ``site``: ``covidscan adapt`` on its signed verdicts, trained by the worker.

    ``actor`` None is the worker itself (the site reached ``adapt_min_patients``); else admins only. One
    challenger at a time per site (a :class:`Conflict` while one is training or awaiting a decision).
    """
    if actor is not None:
        _require_admin(actor, "train challengers")
    _require_live(site)
    if (open_run := _open_run(db, site)) is not None:
        raise Conflict(f"site {site.name!r} already has challenger {open_run.id} ({open_run.state}); "
                       "promote or reject it first", ErrorCode.CHALLENGER_OPEN)
    parent = site.active_run or active_run(db)
    if parent is None:
        raise ConfigError("no run is active: a challenger is adapted from the run that serves the site")
    site_run = SiteRun(site_id=site.id, run="", parent_run=parent, state="training",
                       n_patients=signed_patients(db, site))
    db.add(site_run)
    db.flush()
    record(db, "challenger_requested", actor=actor.name if actor else None, target=f"site:{site.id}",
           site_run=site_run.id, parent=parent, n_patients=site_run.n_patients)
    return site_run


def _decidable(site_run: SiteRun, actor: User, what: str) -> None:
    _require_admin(actor, what)
    if site_run.state != "candidate":
        raise Conflict(f"challenger {site_run.id} is {site_run.state}: only a candidate can be decided",
                       ErrorCode.CHALLENGER_NOT_CANDIDATE)


def promote_site_run(db: Session, site_run: SiteRun, actor: User) -> Site:
    """Serve the challenger's site with it from now on (admins; candidates only; audit-logged). The
    site's local validation starts again from the switch (:func:`set_site_run`)."""
    _decidable(site_run, actor, "promote challengers")
    site = db.get(Site, site_run.site_id)
    for earlier in db.scalars(select(SiteRun).where(SiteRun.site_id == site.id, SiteRun.state == "promoted")):
        earlier.state = "superseded"
    set_site_run(db, site, site_run.run, actor)
    site_run.state, site_run.promoted_at, site_run.promoted_by = "promoted", utcnow(), actor.id
    db.flush()
    record(db, "challenger_promoted", actor=actor.name, target=f"site:{site.id}", site_run=site_run.id,
           run=site_run.run, comparison=site_run.comparison)
    return site


def reject_site_run(db: Session, site_run: SiteRun, actor: User) -> SiteRun:
    """Keep the champion: the challenger is rejected (admins; candidates only; audit-logged)."""
    _decidable(site_run, actor, "reject challengers")
    site_run.state = "rejected"
    db.flush()
    record(db, "challenger_rejected", actor=actor.name, target=f"site:{site_run.site_id}",
           site_run=site_run.id)
    return site_run


def rollback_site(db: Session, site: Site, actor: User) -> Site:
    """Undo the site's last promotion: back to the run promoted before it, else the global run (admins;
    audit-logged; local validation starts again)."""
    _require_admin(actor, "roll back site runs")
    promoted = db.scalars(select(SiteRun).where(SiteRun.site_id == site.id,
                                                SiteRun.state.in_(("promoted", "superseded")))
                          .order_by(SiteRun.promoted_at.desc(), SiteRun.id.desc())).all()
    if not promoted or promoted[0].state != "promoted":
        raise Conflict(f"site {site.name!r} is served by the global run: there is nothing to roll back",
                       ErrorCode.NOTHING_TO_ROLL_BACK)
    current, previous = promoted[0], next(iter(promoted[1:]), None)
    current.state = "rolled_back"
    if previous is not None:
        previous.state = "promoted"
    set_site_run(db, site, previous.run if previous else None, actor)
    record(db, "site_rollback", actor=actor.name, target=f"site:{site.id}", site_run=current.id,
           back_to=previous.run if previous else "global run")
    return site
