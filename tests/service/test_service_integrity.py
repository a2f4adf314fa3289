"""Integrity under attack and load (issue 15 §2), on SQLite and PostgreSQL: signed verdicts inside a keyed
audit chain whose head can be exported, and one 409 for two doctors signing one case at once."""

from __future__ import annotations

import io
import select as socket_select
import socket
import stat
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_helpers import png_bytes, uvicorn_server, wait_predicted
from sqlalchemy import select, text
from typer.testing import CliRunner

from conftest import PASSWORD, add_accounts
from covidscan.cli import app
from covidscan.service.audit import GENESIS, KEY_FILE, _digest, _stamp, record, verify_chain
from covidscan.service.auth import add_user
from covidscan.service.cases import submit_review
from covidscan.service.models import AuditEvent, AuditHead, Case, Site
from covidscan.service.settings import ServiceSettings, open_service


def _cli(*args: str, data_dir: Path, url: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(
        app, [*args, "--data-dir", str(data_dir), "--database-url", url], env=env, catch_exceptions=False
    )


def _signed_case(db) -> tuple[int, int]:
    """A case (no images, so no model result: the doctor's own finding) signed by a doctor; returns (case id,
    review id)."""
    with db.session() as s:
        lab, doctor = add_user(s, "lab", "submitter", None), add_user(s, "dr", "doctor", PASSWORD)
        site = Site(name="lab")
        s.add(site)
        s.flush()
        case = Case(patient_id="p1", submitted_by=lab.id, site_id=site.id, status="ready")
        s.add(case)
        s.flush()
        review = submit_review(s, case, doctor, agree=False, finding="covid", comment="GGO", sign=True)
        return case.id, review.id


def _rewrite_unkeyed(db, from_seq: int = 1) -> None:
    """What someone with write access to the database but not the key does after an edit: recompute every
    hash from ``from_seq`` on with plain SHA-256, and the head with them."""
    with db.session() as s:
        prev = GENESIS if from_seq == 1 else s.get(AuditEvent, from_seq - 1).hash
        for event in s.scalars(select(AuditEvent).where(AuditEvent.seq >= from_seq).order_by(AuditEvent.seq)):
            event.prev_hash = prev
            event.hash = prev = _digest(
                None, prev, event.seq, _stamp(event), event.actor, event.action, event.target, event.detail
            )
        s.get(AuditHead, 1).hash = prev


def test_a_signed_verdict_edited_in_the_reviews_table_is_caught(fresh) -> None:
    db, data_dir, url = fresh
    case_id, review_id = _signed_case(db)
    with db.session() as s:
        assert verify_chain(s).ok
        signature = s.scalars(select(AuditEvent).where(AuditEvent.action == "signature")).one()
        assert signature.detail["review_id"] == review_id and len(signature.detail["review_sha256"]) == 64
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE reviews SET finding = 'normal', agree = false"))
    with db.session() as s:
        report = verify_chain(s)
    assert not report.ok and report.reason.startswith(f"tampered: review {review_id} of case {case_id}")
    result = _cli("audit-log", "verify", data_dir=data_dir, url=url)
    assert result.exit_code == 1 and f"tampered: review {review_id} of case {case_id}" in result.output


def test_a_signed_verdict_inserted_without_a_signature_event_is_caught(fresh) -> None:
    db, _, _ = fresh
    case_id, _ = _signed_case(db)
    with db.engine.begin() as conn:  # a second, forged version straight into the table
        conn.execute(
            text(
                "INSERT INTO reviews (case_id, version, reviewer_id, agree, finding, comment, signed_at, "
                "created_at) SELECT case_id, 2, reviewer_id, false, 'normal', '', signed_at, created_at "
                "FROM reviews"
            )
        )
    with db.session() as s:
        report = verify_chain(s)
    assert not report.ok and f"of case {case_id} is signed but no signature" in report.reason


def test_hashes_recomputed_without_the_key_are_caught(fresh) -> None:
    db, data_dir, url = fresh
    with db.session() as s:
        for i in range(4):
            record(s, "view", actor="dr", target=f"case:{i}")
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
    _rewrite_unkeyed(db)
    with db.session() as s:
        report = verify_chain(s)
    assert not report.ok and report.bad_seq == 1  # the very first hash is no longer the keyed one
    # A later start does not take the rewritten chain for an older version's unkeyed one.
    open_service(ServiceSettings(data_dir=data_dir, database_url=url))[0].dispose()
    assert _cli("audit-log", "verify", data_dir=data_dir, url=url).exit_code == 1


def test_the_key_file_is_private_and_an_environment_key_replaces_it(fresh) -> None:
    db, data_dir, url = fresh
    key_file = data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_text().strip()) == 64
    with db.session() as s:
        record(s, "view", actor="dr", target="case:1")
    assert _cli("audit-log", "verify", data_dir=data_dir, url=url).exit_code == 0
    # Another key (the environment's wins over the file) does not verify what the file's key wrote.
    wrong = _cli("audit-log", "verify", data_dir=data_dir, url=url, env={"COVIDSCAN_AUDIT_KEY": "other"})
    assert wrong.exit_code == 1 and "audit key" in wrong.output


def test_a_rewound_chain_is_caught_against_an_exported_head(fresh) -> None:
    db, data_dir, url = fresh
    with db.session() as s:
        for i in range(3):
            record(s, "view", actor="dr", target=f"case:{i}")
    early = _cli("audit-log", "head", data_dir=data_dir, url=url)
    assert early.exit_code == 0 and early.output.startswith("3:")
    with db.session() as s:
        record(s, "view", actor="dr", target="case:9")
        record(s, "signature", actor="dr", target="case:9")
    head = _cli("audit-log", "head", data_dir=data_dir, url=url).output.strip()
    head_file = data_dir.parent / f"{data_dir.name}-head.txt"
    head_file.write_text(head + "\n")
    assert _cli("audit-log", "verify", "--head", str(head_file), data_dir=data_dir, url=url).exit_code == 0
    assert _cli("audit-log", "verify", "--head", early.output, data_dir=data_dir, url=url).exit_code == 0
    # Rewind: cut the last two events and set the head back. The chain itself is consistent again ...
    with db.engine.begin() as conn:
        third = conn.execute(text("SELECT hash FROM audit_events WHERE seq = 3")).scalar_one()
        conn.execute(text("DELETE FROM audit_events WHERE seq > 3"))
        conn.execute(text("UPDATE audit_head SET seq = 3, hash = :h WHERE id = 1"), {"h": third})
    assert _cli("audit-log", "verify", data_dir=data_dir, url=url).exit_code == 0
    # ... but not with the head exported before the cut.
    rewound = _cli("audit-log", "verify", "--head", str(head_file), data_dir=data_dir, url=url)
    assert rewound.exit_code == 1 and "rewound" in rewound.output
    bad = _cli("audit-log", "verify", "--head", "nonsense", data_dir=data_dir, url=url)
    assert bad.exit_code != 0 and "SEQ:HASH" in bad.output


def test_an_unkeyed_chain_of_an_older_version_stays_readable_as_legacy(fresh) -> None:
    db, data_dir, url = fresh
    _signed_case(db)  # a verdict signed ...
    with db.session() as s:
        record(s, "view", actor="dr", target="case:1")
    with db.engine.begin() as conn:  # ... by a version whose signatures held no verdict hash
        conn.execute(text("UPDATE audit_events SET detail = '{}' WHERE action = 'signature'"))
    _rewrite_unkeyed(db)  # and which hashed without a key: what every chain looked like before
    (data_dir / KEY_FILE).unlink()  # nor had a key file
    n_old = _count(db)
    db2, _ = open_service(ServiceSettings(data_dir=data_dir, database_url=url))  # the first keyed start
    try:
        with db2.session() as s:
            mark = s.scalars(select(AuditEvent).where(AuditEvent.action == "audit_keyed")).one()
            assert mark.seq == n_old + 1 and mark.detail["legacy_until"] == n_old
            record(s, "view", actor="dr", target="case:1")
        with db2.session() as s:
            report = verify_chain(s)
        assert report.ok and report.legacy == n_old and report.n_events == n_old + 2
        result = _cli("audit-log", "verify", data_dir=data_dir, url=url)
        assert result.exit_code == 0 and f"({n_old} written before the chain was keyed)" in result.output
        open_service(ServiceSettings(data_dir=data_dir, database_url=url))[0].dispose()  # marks only once
        # A legacy event edited afterwards is still caught (its plain hash no longer matches).
        with db2.engine.begin() as conn:
            conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 1"))
        with db2.session() as s:
            assert verify_chain(s).bad_seq == 1
    finally:
        db2.dispose()


def _count(db) -> int:
    with db.session() as s:
        return s.get(AuditHead, 1).seq


@pytest.mark.slow
def test_two_doctors_signing_one_case_at_once_get_one_409_on_a_real_server(
    database_url: str, tiny_run: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "service"
    tokens = add_accounts(data_dir, database_url)
    settings = ServiceSettings(data_dir=data_dir, database_url=database_url, run=tiny_run, poll_seconds=0.05)
    with uvicorn_server(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        lab = {"Authorization": f"Bearer {tokens['lab']}"}
        ids = [
            http.post(
                "/api/v1/cases", headers=lab, files=[("files", ("a.png", png_bytes(value=i * 20)))]
            ).json()["id"]
            for i in range(6)
        ]
        for case_id in ids:
            wait_predicted(url, lab, case_id)
        statuses: list[tuple[int, int, str]] = []

        def sign(case_id: int, doctor: str, barrier: threading.Barrier) -> None:
            barrier.wait()
            r = httpx.post(
                f"{url}/api/v1/cases/{case_id}/review",
                headers={"Authorization": f"Bearer {tokens[doctor]}"},
                json={"agree": False, "finding": "covid", "sign": True},  # allowed with or without a result
                timeout=60,
            )
            statuses.append((case_id, r.status_code, r.json().get("code", "")))

        for case_id in ids:
            barrier = threading.Barrier(2)
            threads = [
                threading.Thread(target=sign, args=(case_id, name, barrier)) for name in ("doctor", "doctor2")
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    by_case = {c: sorted((s, code) for cc, s, code in statuses if cc == c) for c in ids}
    for case_id, answers in by_case.items():
        assert answers == [(200, ""), (409, "already_signed")], (case_id, answers)


def _stream_chunked(url: str, path: str, headers: dict[str, str], limit: int) -> tuple[bytes, int, float]:
    """POST a chunked multipart body of up to ``limit`` bytes to a real server, stopping as soon as an
    answer arrives; returns (the answer's first bytes, bytes sent, seconds until the answer)."""
    host, port = url.removeprefix("http://").split(":")
    start, sent, chunk = time.monotonic(), 0, b"x" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Transfer-Encoding: chunked",
            "Content-Type: multipart/form-data; boundary=b0undary",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        preamble = b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
        try:
            while sent < limit:
                if socket_select.select([sock], [], [], 0)[0]:
                    break  # the server answered: stop sending
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server closed the connection after answering
            pass
        sock.settimeout(30)
        answer = sock.recv(4096)
    return answer, sent, time.monotonic() - start


@pytest.mark.slow
def test_an_unauthenticated_huge_chunked_upload_is_refused_before_its_body_is_read(
    tiny_run: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "service"
    add_accounts(data_dir, f"sqlite:///{data_dir / 'service.sqlite3'}")
    with uvicorn_server(ServiceSettings(data_dir=data_dir, run=tiny_run, worker=False)) as url:
        for path, headers, expected in [
            ("/api/v1/cases", {}, b"401"),
            ("/api/v1/cases", {"Authorization": "Bearer not-a-token"}, b"401"),
            ("/upload", {"Cookie": "covidscan_session=forged"}, b"303"),
        ]:
            answer, sent, took = _stream_chunked(url, path, headers, limit=1 << 30)
            assert answer.split(b" ")[1] == expected, (path, answer[:200])
            # A 1 GiB body would take many seconds to spool; the answer came at once, the body unread
            # (what was sent sits in the socket buffers).
            assert sent < 64 << 20 and took < 10, (path, sent, took)


def test_one_pixel_limit_a_small_png_declaring_59_megapixels_is_refused_from_its_header(
    tiny_run: Path, tmp_path: Path
) -> None:
    from covidscan.io import QualityLimits

    bomb = io.BytesIO()
    Image.new("L", (7700, 7700), 0).save(bomb, format="PNG", optimize=True)  # 59.3 megapixels
    assert len(bomb.getvalue()) < 100_000
    settings = ServiceSettings(data_dir=tmp_path / "service", run=tiny_run, worker=False)
    assert settings.max_pixels == QualityLimits().max_pixels  # the upload's limit is the model's
    data_dir = settings.data_dir
    tokens = add_accounts(data_dir, f"sqlite:///{data_dir / 'service.sqlite3'}")
    with uvicorn_server(settings) as url:
        tracemalloc.start()
        try:
            r = httpx.post(
                f"{url}/api/v1/cases",
                headers={"Authorization": f"Bearer {tokens['lab']}"},
                files=[("files", ("bomb.png", bomb.getvalue()))],
                timeout=60,
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert r.status_code == 413 and r.json()["code"] == "too_many_pixels", r.text
    assert peak < 50_000_000, f"{peak / 1e6:.0f} MB traced while refusing a 59-megapixel header"
