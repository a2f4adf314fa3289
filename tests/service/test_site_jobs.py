"""The worker side of the site loop, on SQLite and PostgreSQL: features and the per-site shift test after
each prediction, local figures and the site's status after each signature, the automatic challenger request,
promotion, rejection and rollback, each site scored by its own run, and challengers trained by the worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from site_phantoms import site_patients
from sqlalchemy import select

from conftest import ONE_DATABASE
from covidscan.evaluation.shift import MIN_IMAGES
from covidscan.service.audit import load_audit_key
from covidscan.service.auth import add_user
from covidscan.service.cases import Upload, check_uploads, create_case, submit_review
from covidscan.service.db import Database, migrate
from covidscan.service.errors import Conflict, ErrorCode, NotAllowed
from covidscan.service.models import (
    AuditEvent,
    Case,
    CaseImage,
    Setting,
    Site,
    SiteRun,
    SiteShiftCheck,
    User,
    utcnow,
)
from covidscan.service.sites import (
    find_site,
    promote_site_run,
    record_first_read,
    reject_site_run,
    request_challenger,
    rollback_site,
    set_rules,
)
from covidscan.service.storage import BlobStore
from covidscan.service.worker import HOST, Worker, set_active_run


@pytest.fixture(scope="module")
def svc(database_url: str, tmp_path_factory: pytest.TempPathFactory):
    """(Database, BlobStore) of a migrated service with an admin, two doctors and a submitter."""
    data_dir = tmp_path_factory.mktemp("site_jobs")
    db = Database(database_url, audit_key=load_audit_key(data_dir)[0])
    migrate(db.engine)
    with db.session() as s:
        for name, role in [("admin", "admin"), ("doc", "doctor"), ("doc2", "doctor"), ("lab", "submitter")]:
            add_user(s, name, role, None if role == "submitter" else "correct horse battery")
    yield db, BlobStore(data_dir / "blobs")
    db.dispose()


def _user(s, name: str) -> User:
    return s.scalar(select(User).where(User.name == name))


def _send(s, store: BlobStore, files: list[Path], site: str, patient_id: str) -> int:
    checked = check_uploads([Upload(f.name, f.read_bytes()) for f in files], max_pixels=10**6)
    return create_case(s, store, _user(s, "lab"), checked, patient_id, site=site).id


def _drain(worker: Worker) -> None:
    while worker.run_once():
        pass


def _site(s, name: str) -> Site:
    site = find_site(s, name)
    assert site is not None
    return site


def test_each_prediction_keeps_features_and_a_shifted_site_rings_the_alarm(svc, ood_run, tmp_path) -> None:
    db, store = svc
    set_active_run(db, ood_run, actor="admin")
    other = site_patients(tmp_path / "b", 16, seed=5, site="scanner-b")  # 32 slices
    same = site_patients(tmp_path / "a", 16, seed=6, site="default")
    worker = Worker(db, store)
    for i, patient in enumerate(other[:14]):  # 28 images: below the test's minimum
        with db.session() as s:
            _send(s, store, list(patient.files), "Scanner B", f"b{i}")
    _drain(worker)
    with db.session() as s:
        site = _site(s, "Scanner B")
        assert site.shift is None and site.status == "new"  # too few images to say anything
    for i, patient in enumerate(other[14:]):
        with db.session() as s:
            _send(s, store, list(patient.files), "Scanner B", f"b{14 + i}")
    for i, patient in enumerate(same):
        with db.session() as s:
            _send(s, store, list(patient.files), "Ward A", f"a{i}")
    _drain(worker)
    with db.session() as s:
        images = s.scalars(select(CaseImage)).all()
        assert images and all(im.features_sha256 for im in images if im.error is None)
        b, a = _site(s, "Scanner B"), _site(s, "Ward A")
        assert b.shift["n_images"] == 32 and b.shift["alarm"] and b.shift["auc"] > 0.8
        assert b.shift["details"]["verdict"].startswith("looks unlike")
        assert b.status == "shifted"
        checks = s.scalars(select(SiteShiftCheck).where(SiteShiftCheck.site_id == b.id)).all()
        assert [c.n_images for c in checks] == [30, 32]  # from 30 images on, once per new case
        assert a.shift["n_images"] == 32 and not a.shift["alarm"] and a.status == "new"
        assert MIN_IMAGES == 30


def _predicted_case(s, store: BlobStore, site: str, patient: str, p: float, run: str) -> Case:
    checked = check_uploads([Upload(f"{patient}.png", _png(patient))], max_pixels=10**6)
    case = create_case(s, store, _user(s, "lab"), checked, patient, site=site)
    case.status, case.run, case.predicted_at = "ready", run, utcnow()
    label = "covid" if p >= 0.5 else "non_covid"
    case.group = {"n_images": 1, "p_covid": p, "label": label, "threshold": 0.5}
    case.images[0].p_covid = p
    return case


def _png(seed: str) -> bytes:
    from service_helpers import png_bytes

    return png_bytes(value=sum(map(ord, seed)) % 200 + 20)


def test_signing_refreshes_figures_and_status_and_asks_for_a_challenger(svc, tmp_path) -> None:
    db, store = svc
    run = str(tmp_path)  # the serving run's path is all the figures need
    with db.session() as s:
        s.merge(Setting(key="active_run", value=run))
    with db.session() as s:
        _predicted_case(s, store, "Ward C", "c-first", 0.9, run)  # makes the site
        rules = {"min_patients": 12, "sensitivity_target": 0.5, "specificity_target": 0.5,
                 "adapt_min_patients": 14}
        set_rules(s, _site(s, "Ward C"), rules, _user(s, "admin"))
    statuses = []
    for i in range(16):
        covid = i % 2 == 0
        with db.session() as s:
            case = _predicted_case(s, store, "Ward C", f"c{i}", 0.92 if covid else 0.08, run)
            if i < 4:  # the doctor's own read disagrees with the model on the first four
                record_first_read(s, case, _user(s, "doc"), "non_covid" if covid else "covid")
            submit_review(s, case, _user(s, "doc"), agree=True, finding="covid" if covid else "non_covid",
                          comment="", sign=True)
            site = _site(s, "Ward C")
            statuses.append(site.status)
            runs = s.scalars(select(SiteRun).where(SiteRun.site_id == site.id)).all()
            assert len(runs) == (1 if i >= 13 else 0)  # asked for once, at 14 signed patients
    assert statuses[:11] == ["validating"] * 11 and statuses[11:] == ["validated"] * 5
    with db.session() as s:
        site = _site(s, "Ward C")
        figures = site.local["figures"]
        assert figures["n_patients"] == 16 and figures["metrics"]["sensitivity"]["value"] == 1.0
        assert figures["metrics"]["agreement"]["value"] == pytest.approx(12 / 16)  # the first reads count
        (asked,) = s.scalars(select(SiteRun).where(SiteRun.site_id == site.id)).all()
        assert asked.state == "training" and asked.parent_run == run and asked.n_patients == 14
        changes = s.scalars(select(AuditEvent).where(AuditEvent.action == "site_status",
                                                     AuditEvent.target == f"site:{site.id}")).all()
        assert [e.detail["new"] for e in changes] == ["validating", "validated"]
        with pytest.raises(Conflict) as refused:
            request_challenger(s, site, _user(s, "admin"))
        assert refused.value.code == ErrorCode.CHALLENGER_OPEN


def test_a_global_run_switch_sends_a_validated_site_back_to_new(svc, tmp_path) -> None:
    from covidscan.service.monitoring import after_prediction
    from covidscan.service.sites import reader_first_applies

    db, store = svc
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    with db.session() as s:
        s.merge(Setting(key="active_run", value=old))
    with db.session() as s:
        _predicted_case(s, store, "Ward J", "j-first", 0.9, old)
        rules = {"min_patients": 12, "sensitivity_target": 0.5, "specificity_target": 0.5,
                 "adapt_min_patients": 1000}
        set_rules(s, _site(s, "Ward J"), rules, _user(s, "admin"))
    for i in range(12):
        with db.session() as s:
            case = _predicted_case(s, store, "Ward J", f"j{i}", 0.92 if i % 2 else 0.08, old)
            submit_review(s, case, _user(s, "doc"), agree=True, finding="covid" if i % 2 else "non_covid",
                          comment="", sign=True)
    with db.session() as s:
        assert _site(s, "Ward J").status == "validated"
        s.merge(Setting(key="active_run", value=new))
    with db.session() as s:
        _predicted_case(s, store, "Ward J", "j-new", 0.9, new)
        site = _site(s, "Ward J")
        after_prediction(s, store, site, new, None)  # the new run has proved nothing here yet
        assert site.local is None and site.status == "new" and reader_first_applies(site)


def test_promote_reject_rollback_and_each_site_scored_by_its_run(svc, ood_run, tiny_run, tmp_path) -> None:
    db, store = svc
    set_active_run(db, ood_run, actor="admin")
    patients = site_patients(tmp_path / "d", 3, seed=7, site="scanner-b")
    with db.session() as s:
        _send(s, store, list(patients[0].files), "Ward D", "d0")
        site = _site(s, "Ward D")
        cand = SiteRun(site_id=site.id, run=str(tiny_run), parent_run=str(ood_run), state="candidate")
        other = SiteRun(site_id=site.id, run=str(tiny_run), parent_run=str(ood_run), state="candidate")
        s.add_all([cand, other])
        s.flush()
        with pytest.raises(NotAllowed):
            promote_site_run(s, cand, _user(s, "doc"))
        promote_site_run(s, cand, _user(s, "admin"))
        assert site.active_run == str(tiny_run.resolve()) and cand.state == "promoted"
        with pytest.raises(Conflict) as refused:
            promote_site_run(s, cand, _user(s, "admin"))
        assert refused.value.code == ErrorCode.CHALLENGER_NOT_CANDIDATE
        reject_site_run(s, other, _user(s, "admin"))
        assert other.state == "rejected"
        events = s.scalars(select(AuditEvent).where(AuditEvent.target == f"site:{site.id}"))
        actions = {e.action for e in events}
        assert {"challenger_promoted", "challenger_rejected", "site_run"} <= actions
    with db.session() as s:
        later = _send(s, store, list(patients[1].files), "Ward D", "d1")
        elsewhere = _send(s, store, list(patients[2].files), "Ward E", "e1")
    _drain(Worker(db, store))
    with db.session() as s:
        assert s.get(Case, later).run == str(tiny_run.resolve())  # the site's own run
        assert s.get(Case, elsewhere).run == str(Path(ood_run).resolve())  # the global run
        site = _site(s, "Ward D")
        rollback_site(s, site, _user(s, "admin"))
        assert site.active_run is None and s.get(SiteRun, cand.id).state == "rolled_back"
        with pytest.raises(Conflict) as refused:
            rollback_site(s, site, _user(s, "admin"))
        assert refused.value.code == ErrorCode.NOTHING_TO_ROLL_BACK


def _signed_site(db: Database, store: BlobStore, folder: Path, name: str, n: int, *,
                 only: str | None = None) -> Site:
    """A site whose ``n`` phantom patients were predicted by the worker and signed with their truth."""
    patients = [p for p in site_patients(folder, n, seed=11, site="scanner-b") if only in (None, p.label)]
    ids = []
    for patient in patients:
        with db.session() as s:
            ids.append((_send(s, store, list(patient.files), name, patient.patient_id), patient.label))
    _drain(Worker(db, store))
    for case_id, label in ids:
        with db.session() as s:
            case = s.get(Case, case_id)
            agree = case.group is not None and case.group["label"] == label
            submit_review(s, case, _user(s, "doc2"), agree=agree, finding=label, comment="", sign=True)
    with db.session() as s:
        site = _site(s, name)
        s.expunge(site)
    return site


@pytest.mark.slow
@pytest.mark.parametrize("database_url", [ONE_DATABASE], indirect=True)  # two trainings of 30 s: once
def test_the_worker_trains_a_challenger_and_a_hopeless_one_fails_readably(svc, ood_run, tmp_path) -> None:
    db, store = svc
    set_active_run(db, ood_run, actor="admin")
    good = _signed_site(db, store, tmp_path / "g", "Ward G", 24)
    bad = _signed_site(db, store, tmp_path / "h", "Ward H", 6, only="covid")
    with db.session() as s:
        for site in (good, bad):
            request_challenger(s, s.get(Site, site.id), _user(s, "admin"))
    worker = Worker(db, store)
    trainings = 0
    while worker.train_once():  # these two, and the one Ward C asked for above (its run is not real)
        trainings += 1
    assert trainings >= 2
    with db.session() as s:
        trained = s.scalar(select(SiteRun).where(SiteRun.site_id == good.id))
        assert trained.state == "candidate", trained.error
        assert Path(trained.run).is_dir() and (Path(trained.run) / "model.safetensors").is_file()
        assert set(trained.comparison) >= {"champion", "challenger", "mode", "better"}
        assert trained.comparison["champion"] and trained.comparison["challenger"]
        failed = s.scalar(select(SiteRun).where(SiteRun.site_id == bad.id))
        assert failed.state == "failed" and "no non_covid images" in failed.error


def test_a_challenger_whose_worker_died_ends_failed_not_training(svc, tmp_path) -> None:
    db, store = svc
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with db.session() as s:
        _predicted_case(s, store, "Ward F", "f0", 0.5, str(tmp_path))
        site = _site(s, "Ward F")
        orphan = SiteRun(site_id=site.id, run=str(tmp_path / "half"), parent_run=str(tmp_path),
                         state="training", owner=f"{HOST}:{dead}:0000")
        s.add(orphan)
        s.flush()
        orphan_id = orphan.id
    Worker(db, store).claim_challenger()
    with db.session() as s:
        orphan = s.get(SiteRun, orphan_id)
        assert orphan.state == "failed" and f"{HOST}:{dead}:0000" in orphan.error
        assert "stopped before it finished" in orphan.error
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "challenger_trained")
                          .order_by(AuditEvent.seq.desc())).first()
        assert event.detail["site_run"] == orphan_id and event.detail["state"] == "failed"


def test_a_challenger_that_cannot_even_start_ends_failed_with_the_reason(svc, tmp_path) -> None:
    from covidscan.service.adaptation import train_challenger

    db, store = svc
    blocker = tmp_path / "site-runs"
    blocker.write_text("a file where the run folders go", encoding="utf-8")
    with db.session() as s:
        _predicted_case(s, store, "Ward I", "i0", 0.5, str(tmp_path))
        site_run = SiteRun(site_id=_site(s, "Ward I").id, run="", parent_run=str(tmp_path), state="training")
        s.add(site_run)
        s.flush()
        site_run_id = site_run.id
    ended = train_challenger(db, store, site_run_id, blocker / "site-9-1")
    assert ended.state == "failed" and ended.error.startswith("training crashed (")
    with db.session() as s:
        assert s.get(SiteRun, site_run_id).state == "failed"


def test_a_run_too_small_for_a_shift_test_is_checked_once_not_per_case(tiny_run) -> None:
    from covidscan.errors import ConfigError
    from covidscan.service.scoring import Scorer

    scorer = Scorer(tiny_run)  # 12 validation images: fewer than a shift test needs
    with pytest.raises(ConfigError) as first:
        scorer.reference()
    with pytest.raises(ConfigError) as again:
        scorer.reference()
    assert again.value is first.value  # cached: the worker does not recompute it for every case
