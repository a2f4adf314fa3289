"""Sites, the data layer of local validation: migration 0002 over a database with cases, how a case's site
is chosen, rename and merge, reader-first and first reads, per-site runs and the site's verdicts (SQLite
and PostgreSQL)."""

from __future__ import annotations

import io
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from service_helpers import migrations_head, png_bytes
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from conftest import PASSWORD, PG_ENV, PG_MISSING, fresh_postgres_database
from covidscan.errors import ConfigError
from covidscan.evaluation.site import SiteRules
from covidscan.service.audit import load_audit_key
from covidscan.service.auth import add_user
from covidscan.service.cases import (
    Upload,
    WorklistQuery,
    check_uploads,
    create_case,
    export_verdicts,
    submit_review,
    worklist,
)
from covidscan.service.db import MIGRATIONS, Database, migrate
from covidscan.service.errors import Conflict, NotAllowed
from covidscan.service.models import AuditEvent, Case, FirstRead, Review, Setting, Site, User, utcnow
from covidscan.service.schemas import CaseOut
from covidscan.service.sites import (
    find_site,
    first_read_for,
    get_site,
    list_sites,
    merge_sites,
    put_features,
    read_features,
    reader_first_applies,
    record_first_read,
    record_shift_check,
    rename_site,
    resolve_site,
    run_for_case,
    set_reader_first,
    set_rules,
    set_site_run,
    set_status,
    signed_site_cases,
    site_features,
    site_rules,
    site_verdicts_manifest,
)
from covidscan.service.storage import BlobStore
from dicom_files import write_dicom


def _alembic(db: Database, revision: str, *, down: bool = False) -> None:
    """Move the schema to ``revision`` with Alembic itself (not the once-per-process ``migrate``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database per test (the migration test builds its own history)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sites.sqlite3'}"
    if not os.environ.get(PG_ENV):
        pytest.skip(PG_MISSING)
    return fresh_postgres_database(os.environ[PG_ENV])


def test_migration_0002_gives_existing_cases_a_site_per_submitter(empty_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from covidscan.service.models import Base

    db = Database(empty_url)
    _alembic(db, "0001")
    at = "2026-01-01 10:00:00"
    with db.engine.begin() as conn:  # a service as 0001 left it: two labs' cases, an image, a signed review
        conn.execute(text(
            "INSERT INTO users (id, name, role, active, created_at) VALUES "
            f"(1, 'lab-a', 'submitter', true, '{at}'), (2, 'dr', 'doctor', true, '{at}'), "
            f"(3, 'lab-b', 'submitter', true, '{at}'), (4, 'idle', 'submitter', true, '{at}')"
        ))
        conn.execute(text(
            "INSERT INTO cases (id, submitted_by, status, created_at) VALUES "
            f"(1, 1, 'signed', '{at}'), (2, 3, 'ready', '{at}'), (3, 1, 'queued', '{at}')"
        ))
        conn.execute(text(
            "INSERT INTO case_images (id, case_id, position, original_name, sha256, size, suffix, "
            f"display_sha256, width, height) VALUES (1, 1, 0, 'a.png', '{'a' * 64}', 10, '.png', "
            f"'{'b' * 64}', 8, 8)"
        ))
        conn.execute(text(
            "INSERT INTO reviews (id, case_id, version, reviewer_id, agree, finding, comment, signed_at, "
            f"created_at) VALUES (1, 1, 1, 2, true, 'covid', '', '{at}', '{at}')"
        ))
        conn.execute(text(f"INSERT INTO jobs (id, case_id, state, attempts, created_at) VALUES "
                          f"(1, 1, 'done', 1, '{at}')"))
    _alembic(db, "head")
    with db.engine.connect() as conn:
        sites = conn.execute(text(
            "SELECT cases.id, sites.name, sites.status FROM cases JOIN sites ON sites.id = cases.site_id "
            "ORDER BY cases.id"
        )).all()
        assert [tuple(r) for r in sites] == [(1, "lab-a", "new"), (2, "lab-b", "new"), (3, "lab-a", "new")]
        assert conn.execute(text("SELECT count(*) FROM sites")).scalar() == 2  # not one for 'idle'
        assert conn.execute(text("SELECT count(*) FROM case_images")).scalar() == 1
        assert conn.execute(text("SELECT finding FROM reviews")).scalar() == "covid"
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == migrations_head()
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if db.engine.dialect.name == "sqlite":  # the table rebuild left no orphan and enforcement back on
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(IntegrityError), db.engine.begin() as conn:  # every case has a site from now on
        conn.execute(
            text(f"INSERT INTO cases (submitted_by, status, created_at) VALUES (1, 'queued', '{at}')")
        )
    _alembic(db, "0001", down=True)
    _alembic(db, "head")  # down and up again: the backfill is repeatable
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cases WHERE site_id IS NOT NULL")).scalar() == 3
    db.dispose()


@pytest.fixture(scope="module")
def svc(database_url: str, tmp_path_factory: pytest.TempPathFactory):
    """(Database, BlobStore, data folder) of a migrated service with its accounts."""
    data_dir = tmp_path_factory.mktemp("sites")
    db = Database(database_url, audit_key=load_audit_key(data_dir)[0])
    migrate(db.engine)
    with db.session() as s:
        for name, role in [("admin", "admin"), ("doc", "doctor"), ("doc2", "doctor"), ("lab", "submitter"),
                           ("lab2", "submitter"), ("lab3", "submitter"), ("lab4", "submitter")]:
            add_user(s, name, role, None if role == "submitter" else PASSWORD)
    yield db, BlobStore(data_dir / "blobs"), data_dir
    db.dispose()


def _user(s, name: str) -> User:
    return s.scalar(select(User).where(User.name == name))


def _case(s, store: BlobStore, submitter: str, *, site: str | None = None, value: int = 100,
          uploads: list[Upload] | None = None) -> Case:
    checked = check_uploads(uploads or [Upload("a.png", png_bytes(value=value))], max_pixels=10**6)
    return create_case(s, store, _user(s, submitter), checked, None, site=site)


def _predicted(case: Case, p: float, run: str = "/runs/global") -> None:
    """What the worker writes once a case is predicted."""
    case.status, case.run, case.predicted_at = "ready", run, utcnow()
    label = "covid" if p >= 0.5 else "non_covid"
    case.group = {"n_images": 1, "p_covid": p, "label": label, "threshold": 0.5}
    for im in case.images:  # each image its probability (the export takes only images the model read)
        im.p_covid, im.label = p, label


def _dicom_upload(tmp_path: Path, **tags: str) -> Upload:
    stored = (np.arange(64 * 64, dtype=np.int16).reshape(64, 64) % 900) - 900
    path = write_dicom(tmp_path / "slice.dcm", stored, RescaleSlope=1, RescaleIntercept=0, **tags)
    return Upload("slice.dcm", path.read_bytes())


def test_site_comes_from_the_sender_then_dicom_institution_then_station_then_the_account(svc, tmp_path):
    db, store, _ = svc
    with db.session() as s:
        plain = _case(s, store, "lab")
        assert plain.site.name == "lab"  # the account's name by default
        both = _dicom_upload(tmp_path, InstitutionName="St Mary Hospital", StationName="CT-2")
        assert _case(s, store, "lab", uploads=[both]).site.name == "St Mary Hospital"
        station = _dicom_upload(tmp_path, StationName="CT-2")
        assert _case(s, store, "lab", uploads=[station]).site.name == "CT-2"
        assert _case(s, store, "lab", uploads=[both], site="  Scanner   B ").site.name == "Scanner B"
        # names match in any letter case: one site, spelled as first seen
        assert _case(s, store, "lab", site="SCANNER b").site_id == find_site(s, "scanner b").id
        tags = check_uploads([both], max_pixels=10**6)[0].info.dicom
        assert tags.items() >= {"InstitutionName": "St Mary Hospital", "StationName": "CT-2"}.items()
        # a DICOM association's calling AE title comes before the file's InstitutionName (not before `site`)
        lab = _user(s, "lab")
        for given, sender, site in [(None, "PACS-A", "PACS-A"), (None, " ", "St Mary Hospital"),
                                    ("Ward 3", "PACS-A", "Ward 3")]:
            assert resolve_site(s, explicit=given, submitter=lab, dicom=tags, sender_ae=sender).name == site
        record = s.scalar(select(AuditEvent).where(AuditEvent.action == "site_created",
                                                   AuditEvent.detail["name"].as_string() == "Scanner B"))
        assert record is not None and record.actor == "lab"


def test_bad_site_names_are_refused_with_one_clear_error(svc) -> None:
    db, store, _ = svc
    for bad, words in [("ward\x07", "control characters"), ("a\nb", "control characters"),
                       ("x" * 129, "at most 128")]:
        with pytest.raises(ConfigError, match=words), db.session() as s:
            _case(s, store, "lab2", site=bad)
    with db.session() as s:  # nothing was half-created
        assert find_site(s, "a b") is None and find_site(s, "x" * 129) is None
        # a DICOM value the sender did not type is passed over, not refused
        site = resolve_site(s, explicit=None, submitter=_user(s, "lab2"),
                            dicom={"InstitutionName": "bad\x01name", "StationName": "Station 9\x00\x00"})
        assert site.name == "Station 9"
        assert resolve_site(s, explicit="", submitter=_user(s, "lab2"), dicom=None).name == "lab2"


def test_rename_is_for_admins_refuses_a_taken_name_and_is_audited(svc) -> None:
    db, store, _ = svc
    with db.session() as s:
        site = _case(s, store, "lab", site="Rename Me").site
        _case(s, store, "lab", site="Taken")
        with pytest.raises(NotAllowed):
            rename_site(s, site, "New Name", _user(s, "doc"))
        with pytest.raises(Conflict, match="merge"):
            rename_site(s, site, "TAKEN", _user(s, "admin"))
        with pytest.raises(ConfigError, match="control"):
            rename_site(s, site, "tab\there", _user(s, "admin"))
        rename_site(s, site, " Renamed  Site ", _user(s, "admin"))
        assert get_site(s, site.id).name == "Renamed Site"
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "site_rename")
                         .order_by(AuditEvent.seq.desc()))
        assert event.actor == "admin" and event.detail == {"old": "Rename Me", "new": "Renamed Site"}


def test_merge_moves_cases_marks_the_source_and_later_images_follow(svc) -> None:
    db, store, _ = svc
    with db.session() as s:
        source_cases = [_case(s, store, "lab3", site="Old Scanner", value=v).id for v in (10, 11)]
        target = _case(s, store, "lab3", site="Main Hospital").site
        source = find_site(s, "Old Scanner")
        target.local = {"stale": True}
        with pytest.raises(Conflict, match="itself"):
            merge_sites(s, target, target, _user(s, "admin"))
        assert merge_sites(s, source, target, _user(s, "admin")) == 2
        assert {s.get(Case, i).site_id for i in source_cases} == {target.id}
        assert get_site(s, source.id).merged_into_id == target.id and target.local is None
        # images still named after the old site land in the site it became
        assert _case(s, store, "lab3", site="old scanner").site_id == target.id
        with pytest.raises(Conflict, match="merged into 'Main Hospital'"):
            rename_site(s, source, "Revived", _user(s, "admin"))
        listed = {x.site.name: x for x in list_sites(s)}
        assert "Old Scanner" not in listed and listed["Main Hospital"].n_cases == 4
        assert "Old Scanner" in {x.site.name for x in list_sites(s, include_merged=True)}
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "site_merge"))
        assert event.actor == "admin" and event.target == f"site:{source.id}"
        assert event.detail["into"] == "Main Hospital" and event.detail["cases"] == 2


def test_reader_first_by_default_until_validated_and_an_admin_override(svc) -> None:
    db, store, _ = svc
    with db.session() as s:
        case = _case(s, store, "lab", site="Reader First Site")
        site = case.site
        assert reader_first_applies(site) and CaseOut.from_case(case).site.model_dump() == {
            "id": site.id, "name": "Reader First Site", "status": "new", "reader_first": True,
            "local": None, "shift": None,
        }
        set_status(s, site, "validated", reason="figures met the rules")
        assert not reader_first_applies(site)  # the default: validated sites show the model at once
        with pytest.raises(NotAllowed):
            set_reader_first(s, site, True, _user(s, "doc"))
        set_reader_first(s, site, True, _user(s, "admin"))
        assert reader_first_applies(site)  # forced on although validated
        set_reader_first(s, site, False, _user(s, "admin"))
        set_status(s, site, "degraded")
        assert not reader_first_applies(site)  # forced off
        set_reader_first(s, site, None, _user(s, "admin"))
        assert reader_first_applies(site)  # back to the rule
        with pytest.raises(ConfigError, match="status"):
            set_status(s, site, "trusted")
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.target == f"site:{site.id}")).all()
        assert actions.count("site_status") == 2 and actions.count("site_reader_first") == 3


def test_first_reads_are_kept_apart_from_verdicts(svc) -> None:
    db, store, _ = svc
    with db.session() as s:
        case = _case(s, store, "lab", site="First Read Site")
        doc, doc2 = _user(s, "doc"), _user(s, "doc2")
        record_first_read(s, case, doc, "non_covid")  # before the prediction is even ready
        with pytest.raises(Conflict, match="cannot change"):
            record_first_read(s, case, doc, "covid")
        with pytest.raises(NotAllowed):
            record_first_read(s, case, _user(s, "admin"), "covid")
        with pytest.raises(ConfigError, match="finding"):
            record_first_read(s, case, doc2, "maybe")
        _predicted(case, 0.9)
        submit_review(s, case, doc2, agree=True, finding="covid", comment="", sign=False)
        with pytest.raises(Conflict, match="verdict"):  # doc2 has seen the model by now
            record_first_read(s, case, doc2, "covid")
        submit_review(s, case, doc, agree=True, finding="covid", comment="", sign=True)
        assert first_read_for(s, case, doc).finding == "non_covid"  # unchanged by the verdict
        assert first_read_for(s, case, doc2) is None
        assert s.scalar(select(Review.finding).where(Review.case_id == case.id)) == "covid"
        assert len(s.scalars(select(FirstRead).where(FirstRead.case_id == case.id)).all()) == 1
        [row] = signed_site_cases(s, case.site)
        assert (row.label, row.predicted, row.first_read, row.p_covid) == (1, 1, "non_covid", 0.9)


def test_site_verdicts_carry_the_site_and_feed_local_validation(svc) -> None:
    from covidscan.data import read_manifest

    db, store, data_dir = svc
    with db.session() as s:
        doc = _user(s, "doc")
        signed = {}
        verdicts = [("Verdict A", 0.8, "covid"), ("Verdict A", 0.3, "non_covid"),
                    ("Verdict A", 0.6, "indeterminate"), ("Verdict B", 0.7, "covid")]
        for i, (site, p, finding) in enumerate(verdicts):
            case = _case(s, store, "lab4", site=site, value=200 + i)
            case.patient_id = f"pt-{i}"
            _predicted(case, p)
            agree = finding == case.group["label"]
            submit_review(s, case, doc, agree=agree, finding=finding, comment="", sign=True)
            signed[case.id] = case
        _case(s, store, "lab4", site="Verdict A", value=250)  # unsigned: not a verdict
        a = find_site(s, "Verdict A")
        table = pd.read_csv(io.StringIO(export_verdicts(s, store)))
        assert list(table.columns) == ["path", "label", "patient_id", "site"]
        mine = table[table.patient_id.str.startswith("pt-")]
        pairs = sorted(zip(mine.patient_id, mine.site, strict=True))
        assert pairs == [("pt-0", "Verdict A"), ("pt-1", "Verdict A"), ("pt-3", "Verdict B")]
        manifest = data_dir / "verdict-a.csv"
        manifest.write_text(site_verdicts_manifest(s, store, a), encoding="utf-8")
        read = read_manifest(manifest)  # what `covidscan adapt --data` reads
        assert sorted(read["label"]) == ["covid", "non_covid"] and set(read["site"]) == {"Verdict A"}
        rows = signed_site_cases(s, a)
        assert [(r.patient_id, r.label, r.p_covid) for r in rows] == [("pt-0", 1, 0.8), ("pt-1", 0, 0.3)]
        assert signed_site_cases(s, a, since=utcnow() + timedelta(seconds=1)) == []
        assert site_rules(a) == SiteRules()


def test_rules_are_checked_and_merged_over_the_defaults(svc) -> None:
    db, store, _ = svc
    with db.session() as s:
        site = _case(s, store, "lab", site="Rules Site").site
        admin = _user(s, "admin")
        assert set_rules(s, site, {"min_patients": 80, "sensitivity_target": 0.8}, admin) == SiteRules(
            min_patients=80, sensitivity_target=0.8
        )
        assert site.rules == {"min_patients": 80, "sensitivity_target": 0.8}  # only what the admin set
        for bad, words in [({"min_patients": 0.5}, "min_patients: Input should be a valid integer"),
                           ({"specificity_target": 1.5}, "less than or equal to 1"),
                           ({"speed": 1}, "speed: Extra inputs"), ({"recent_window": True}, "recent_window")]:
            with pytest.raises(ConfigError, match=words):
                set_rules(s, site, bad, admin)
        with pytest.raises(NotAllowed):
            set_rules(s, site, None, _user(s, "doc"))
        assert set_rules(s, site, None, admin) == SiteRules() and site.rules is None


def test_each_site_is_served_by_its_own_run_or_the_global_one(svc, tmp_path) -> None:
    db, store, _ = svc
    champion = tmp_path / "site-run"
    champion.mkdir()
    with db.session() as s:
        setting = s.get(Setting, "active_run") or Setting(key="active_run", value="")
        setting.value = "/runs/global"
        s.add(setting)
        here, elsewhere = _case(s, store, "lab", site="Run Site"), _case(s, store, "lab", site="Other Site")
        site = here.site
        set_status(s, site, "validated")
        assert run_for_case(s, here) == run_for_case(s, elsewhere) == "/runs/global"
        with pytest.raises(NotAllowed):
            set_site_run(s, site, champion, _user(s, "doc"))
        with pytest.raises(ConfigError, match="not a directory"):
            set_site_run(s, site, tmp_path / "missing", _user(s, "admin"))
        site.local = {"roc_auc": 0.9}
        assert set_site_run(s, site, champion, _user(s, "admin")) == str(champion.resolve())
        assert run_for_case(s, here) == str(champion.resolve())
        assert run_for_case(s, elsewhere) == "/runs/global"
        # local validation starts again: the new run has proved nothing at this site yet
        assert site.run_since is not None and site.local is None and site.status == "validating"
        assert reader_first_applies(site)
        set_site_run(s, site, None, _user(s, "admin"))
        assert run_for_case(s, here) == "/runs/global"
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "site_run")
                           .order_by(AuditEvent.seq)).all()
        assert [e.detail["new"] for e in events[-2:]] == [str(champion.resolve()), None]


def test_worklist_filters_by_site_and_features_and_shift_checks_are_kept(svc) -> None:
    db, store, _ = svc
    with db.session() as s:
        wanted = [_case(s, store, "lab", site="Worklist Site", value=v) for v in (30, 31)]
        _case(s, store, "lab", site="Elsewhere")
        site = wanted[0].site
        listed = worklist(s, _user(s, "doc"), WorklistQuery(filter="all", site=site.name)).cases
        assert sorted(c.id for c in listed) == sorted(c.id for c in wanted)
        for i, case in enumerate(wanted):
            _predicted(case, 0.5, run="/runs/r1")
            case.images[0].features_sha256 = put_features(store, np.full(4, i, dtype=np.float64))
        assert read_features(store, wanted[1].images[0].features_sha256).dtype == np.float32
        features = site_features(s, store, site, run="/runs/r1")
        assert features.shape == (2, 4) and features[1].tolist() == [1.0] * 4
        assert site_features(s, store, site, run="/runs/other").shape == (0, 0)
        record_shift_check(s, site, run="/runs/r1", n_images=2, auc=0.93, p_value=0.001, alarm=True)
        assert site.shift["alarm"] is True and site.shift["auc"] == 0.93
        assert s.scalar(select(Site).where(Site.id == site.id)).shift["n_images"] == 2
