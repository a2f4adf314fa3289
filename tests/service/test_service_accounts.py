"""Accounts against a real Uvicorn on 127.0.0.1 (SQLite and PostgreSQL): login throttling that stops a
guesser but never locks a doctor out, deactivation, passwords (change, reset, policy), revoking tokens
with sessions, the sessions' idle timeout, the admin page's controls and `covidscan users`.

Client addresses are real: each test client binds its socket to its own loopback address (127.0.0.2,
127.0.0.3, ...; Linux routes all of 127/8 to the loopback device), so the server sees distinct addresses
exactly as it would from distinct machines. No header is trusted for it: Uvicorn rewrites the address
from X-Forwarded-For only for connections from FORWARDED_ALLOW_IPS (by default 127.0.0.1 alone).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import test_sites
from service_helpers import uvicorn_server
from sqlalchemy import func, select

from conftest import PASSWORD, add_accounts
from covidscan.service.errors import ErrorCode

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
NEW_PASSWORD = "quiet lantern orbit meadow"
empty_url = test_sites.empty_url  # the fixture: a fresh, empty database per test (SQLite and PostgreSQL)
_alembic = test_sites._alembic


@dataclass
class Server:
    """The running service: its URL, database, data folder and the test accounts' API tokens."""

    url: str
    db: object
    data_dir: Path
    database_url: str
    tokens: dict[str, str]

    def browser(self, address: str) -> httpx.Client:
        """A client whose connections come from ``address`` (a cookie jar of its own, no redirects)."""
        return httpx.Client(
            base_url=self.url, transport=httpx.HTTPTransport(local_address=address), timeout=30
        )

    def api(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def add(self, name: str, role: str = "doctor") -> str:
        """A new account with ``PASSWORD`` and an API token, for one test's own use."""
        from covidscan.service.auth import add_user, new_token

        with self.db.session() as s:
            self.tokens[name] = new_token(s, add_user(s, name, role, PASSWORD))
        return name


@pytest.fixture(scope="module")
def server(database_url: str, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from covidscan.service.db import Database
    from covidscan.service.settings import ServiceSettings

    data_dir = tmp_path_factory.mktemp("accounts")
    tokens = add_accounts(data_dir, database_url)
    settings = ServiceSettings(data_dir=data_dir, database_url=database_url, run=tiny_run, worker=False)
    db = Database(database_url)
    with uvicorn_server(settings) as url:
        yield Server(url, db, data_dir, database_url, tokens)
    db.dispose()


def login(
    client: httpx.Client, name: str, password: str = PASSWORD, headers: dict[str, str] | None = None
) -> httpx.Response:
    """The login form, as a browser fills it in (login CSRF cookie and field)."""
    page = client.get("/login")
    return client.post(
        "/login",
        data={"name": name, "password": password, "csrf": CSRF.search(page.text).group(1)},
        headers=headers,
    )


def logged_in(client: httpx.Client) -> bool:
    """Whether the client's session cookie still opens the worklist (a dead one redirects to /login)."""
    return client.get("/worklist").status_code == 200


def page_csrf(client: httpx.Client, path: str = "/worklist") -> str:
    return CSRF.search(client.get(path).text).group(1)


def audit_actions(server: Server, target: str) -> list[str]:
    from covidscan.service.models import AuditEvent

    with server.db.session() as s:
        return list(s.scalars(select(AuditEvent.action).where(AuditEvent.target == target)))


def test_a_guesser_gets_growing_waits_and_never_locks_the_doctor_out(server: Server) -> None:
    doctor = server.add("dr-nat")
    # The doctor's own browser logged in before, from the hospital's address (a NAT the guesser shares).
    with server.browser("127.0.0.2") as own_browser:
        assert login(own_browser, doctor).status_code == 303
        assert own_browser.cookies.get("covidscan_device")
        own_browser.post("/logout", data={"csrf": page_csrf(own_browser)})
        with server.browser("127.0.0.2") as guesser:
            answers = [login(guesser, doctor, f"guess number {i:02d}!") for i in range(20)]
            # A header naming another address is not believed (the guesser is not a trusted proxy).
            dodge = login(guesser, doctor, "one more guess", headers={"X-Forwarded-For": "203.0.113.9"})
        codes = [r.status_code for r in answers]
        assert codes == [401] * 5 + [429] * 15
        waits = [int(r.headers["retry-after"]) for r in answers[5:]]
        # 1, 2, 4, ... 512 s, then the 15-minute cap (less the moments that pass while it holds)
        assert waits[:11] == sorted(set(waits[:11])) and waits[0] >= 1 and min(waits[10:]) >= 600, waits
        assert "Wait" in answers[-1].text  # a page for a person, not JSON
        assert dodge.status_code == 429
        # The doctor's known browser still logs in from that very address ...
        assert login(own_browser, doctor).status_code == 303 and logged_in(own_browser)
    # ... and so does a browser the doctor never used, from anywhere else.
    with server.browser("127.0.0.3") as elsewhere:
        assert login(elsewhere, doctor).status_code == 303 and logged_in(elsewhere)
    # The guesser's address, without the doctor's device cookie, still waits.
    with server.browser("127.0.0.2") as stranger:
        refused = login(stranger, doctor)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 600


def test_guesses_sent_at_once_get_no_more_free_tries_than_guesses_sent_one_by_one(server: Server) -> None:
    # The password check runs outside the database transaction (a login flood must not hold the database),
    # so each attempt is counted before its check: 20 guesses in flight together still get 5 tries.
    doctor = server.add("dr-burst")

    def guess(i: int) -> int:
        with server.browser("127.0.0.30") as guesser:
            return login(guesser, doctor, f"burst guess {i:02d}!").status_code

    with ThreadPoolExecutor(20) as pool:
        codes = Counter(pool.map(guess, range(20)))
    assert codes == {401: 5, 429: 15}, codes


def test_guessing_spread_over_many_addresses_loses_the_free_tries_but_not_the_doctor(server: Server) -> None:
    doctor = server.add("dr-spread")
    for address in ("127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.20", "127.0.0.21"):
        with server.browser(address) as guesser:
            assert [login(guesser, doctor, "wrong password!").status_code for _ in range(2)] == [401] * 2
    # 10 wrong passwords on the account: a new address now waits after its first wrong guess ...
    with server.browser("127.0.0.7") as guesser:
        assert login(guesser, doctor, "wrong password!").status_code == 401
        assert login(guesser, doctor, "wrong password!").status_code == 429
    # ... while the right password from an address that has not failed logs in at once.
    with server.browser("127.0.0.8") as doctor_browser:
        assert login(doctor_browser, doctor).status_code == 303


def test_deactivation_stops_login_tokens_and_sessions_at_once(server: Server) -> None:
    name = server.add("dr-leaving")
    with server.browser("127.0.0.10") as browser:
        assert login(browser, name).status_code == 303 and logged_in(browser)
        assert httpx.get(f"{server.url}/api/v1/me", headers=server.api(name)).status_code == 200
        r = httpx.post(f"{server.url}/api/v1/users/{name}/deactivate", headers=server.api("admin"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user"]["active"] is False and body["tokens_revoked"] == 1 and body["sessions_ended"] == 1
        assert not logged_in(browser)
        assert httpx.get(f"{server.url}/api/v1/me", headers=server.api(name)).status_code == 401
        assert login(browser, name).status_code == 401
        r = httpx.post(f"{server.url}/api/v1/users/{name}/activate", headers=server.api("admin"))
        assert r.status_code == 200 and r.json()["user"]["active"] is True
        # Reactivated, the old token stays revoked; a new login works.
        assert httpx.get(f"{server.url}/api/v1/me", headers=server.api(name)).status_code == 401
        assert login(browser, name).status_code == 303 and logged_in(browser)
    assert audit_actions(server, f"user:{name}")[-2:] == ["user_deactivate", "user_activate"]
    users = httpx.get(f"{server.url}/api/v1/users", headers=server.api("admin")).json()
    assert {u["name"]: u["active"] for u in users}[name] is True
    for who in ("doctor", "lab"):  # admins only
        r = httpx.post(f"{server.url}/api/v1/users/{name}/deactivate", headers=server.api(who))
        assert r.status_code == 403 and r.json()["code"] == ErrorCode.FORBIDDEN_ROLE
    r = httpx.post(f"{server.url}/api/v1/users/nobody/deactivate", headers=server.api("admin"))
    assert r.status_code == 404 and r.json()["code"] == ErrorCode.NOT_FOUND


def test_the_last_active_admin_cannot_be_deactivated(server: Server) -> None:
    r = httpx.post(f"{server.url}/api/v1/users/admin/deactivate", headers=server.api("admin"))
    assert r.status_code == 409 and r.json()["code"] == ErrorCode.LAST_ADMIN
    assert httpx.get(f"{server.url}/api/v1/me", headers=server.api("admin")).status_code == 200


def test_revoking_ends_browser_sessions_together_with_tokens(server: Server) -> None:
    name = server.add("dr-lost-laptop")
    with server.browser("127.0.0.11") as browser:
        assert login(browser, name).status_code == 303 and logged_in(browser)
        r = httpx.post(f"{server.url}/api/v1/users/{name}/revoke", headers=server.api("admin"))
        assert r.status_code == 200 and (r.json()["tokens_revoked"], r.json()["sessions_ended"]) == (1, 1)
        assert not logged_in(browser)
        assert httpx.get(f"{server.url}/api/v1/me", headers=server.api(name)).status_code == 401
        assert login(browser, name).status_code == 303  # the account itself stays usable
    assert "access_revoke" in audit_actions(server, f"user:{name}")


def test_changing_your_password_needs_the_current_one_and_ends_your_other_sessions(server: Server) -> None:
    name = server.add("dr-change")
    with server.browser("127.0.0.12") as here, server.browser("127.0.0.13") as there:
        assert login(here, name).status_code == 303 and login(there, name).status_code == 303
        headers = {"X-CSRF-Token": page_csrf(here)}

        def change(current: str, new: str) -> httpx.Response:
            body = {"current_password": current, "new_password": new}
            return here.post("/api/v1/me/password", json=body, headers=headers)

        r = change("not my password", NEW_PASSWORD)
        assert r.status_code == 403 and r.json()["code"] == ErrorCode.WRONG_PASSWORD
        r = change(PASSWORD, "short")
        assert r.status_code == 422 and r.json()["code"] == ErrorCode.WEAK_PASSWORD
        r = change(PASSWORD, "qwerty123456")
        assert r.status_code == 422 and r.json()["code"] == ErrorCode.WEAK_PASSWORD
        r = change(PASSWORD, NEW_PASSWORD)
        assert r.status_code == 200 and r.json()["sessions_ended"] == 1
        assert logged_in(here) and not logged_in(there)
        assert login(there, name).status_code == 401
        assert login(there, name, NEW_PASSWORD).status_code == 303
        # A stolen session is no guessing oracle: wrong current passwords are throttled like logins.
        codes = [change(f"guess {i}", "another fine passphrase").status_code for i in range(6)]
        assert codes[-1] == 429 and 403 in codes
        r = change("guess 7", "another fine passphrase")
        assert r.json()["code"] == ErrorCode.LOGIN_THROTTLED and int(r.headers["retry-after"]) >= 1
    assert audit_actions(server, f"user:{name}")[-1] == "password_change"


def test_an_admin_resets_a_password_and_the_accounts_sessions_end(server: Server) -> None:
    name = server.add("dr-forgot")
    url = f"{server.url}/api/v1/users/{name}/password"
    with server.browser("127.0.0.14") as browser:
        assert login(browser, name).status_code == 303
        r = httpx.post(url, json={"password": "password1234"}, headers=server.api("admin"))
        assert r.status_code == 422 and r.json()["code"] == ErrorCode.WEAK_PASSWORD
        r = httpx.post(url, json={"password": NEW_PASSWORD}, headers=server.api("doctor"))
        assert r.status_code == 403
        r = httpx.post(url, json={"password": NEW_PASSWORD}, headers=server.api("admin"))
        assert r.status_code == 200 and r.json()["sessions_ended"] == 1
        assert not logged_in(browser)
        assert login(browser, name, NEW_PASSWORD).status_code == 303
    assert audit_actions(server, f"user:{name}")[-1] == "password_reset"


@pytest.mark.parametrize(
    "password",
    [
        "short pw",
        "qwerty123456",
        "password1234",
        "1qaz2wsx3edc",
        "aaaaaaaaaaaaaaa",
        "abababababab",
        "dr-policy is my password",
    ],
)
def test_the_policy_refuses_short_simple_common_and_name_passwords(password: str) -> None:
    from covidscan.service.auth import check_password_policy
    from covidscan.service.errors import WeakPassword

    with pytest.raises(WeakPassword):
        check_password_policy(password, "dr-policy")


def test_the_policy_accepts_a_long_uncommon_password_and_ships_its_list() -> None:
    from covidscan.service.auth import COMMON_PASSWORDS, _common_passwords, check_password_policy

    check_password_policy(NEW_PASSWORD, "dr-policy")
    check_password_policy(PASSWORD, "dr-policy")
    assert COMMON_PASSWORDS.is_file() and len(_common_passwords()) > 19_000
    assert "qwerty123456" in _common_passwords()


@pytest.mark.parametrize(
    ("host", "key"),
    [("127.0.0.2", "127.0.0.2"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
     ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"), ("::ffff:10.0.0.1", "10.0.0.1")],
)
def test_ipv6_clients_are_throttled_by_their_64_network(host: str, key: str) -> None:
    from covidscan.service.auth import throttle_address

    assert throttle_address(host) == key  # one machine's /64 is not 2**64 fresh addresses to guess from


def test_an_idle_session_ends_and_an_active_one_lives_on(server: Server) -> None:
    from covidscan.service.models import User, WebSession, utcnow

    name = server.add("dr-idle")

    def set_last_seen(minutes_ago: float) -> None:
        with server.db.session() as s:
            user_id = s.scalar(select(User.id).where(User.name == name))
            s.execute(
                WebSession.__table__.update()
                .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
                .values(last_seen_at=utcnow() - timedelta(minutes=minutes_ago))
            )

    with server.browser("127.0.0.15") as browser:
        assert login(browser, name).status_code == 303
        set_last_seen(29)  # 29 of the 30 idle minutes: still alive, and the request restarts the clock
        assert logged_in(browser)
        with server.db.session() as s:
            user_id = s.scalar(select(User.id).where(User.name == name))
            seen = s.scalar(select(func.max(WebSession.last_seen_at)).where(WebSession.user_id == user_id))
        assert utcnow() - seen < timedelta(minutes=1)
        set_last_seen(31)
        assert not logged_in(browser)
        r = browser.get("/worklist")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_the_admin_page_deactivates_resets_and_revokes(server: Server) -> None:
    name = server.add("dr-page")
    with server.browser("127.0.0.16") as admin, server.browser("127.0.0.17") as doctor:
        assert login(admin, "admin").status_code == 303 and login(doctor, name).status_code == 303
        page = admin.get("/admin")
        assert f'action="/admin/users/{name}/deactivate"' in page.text
        csrf = CSRF.search(page.text).group(1)
        r = admin.post(f"/admin/users/{name}/deactivate", data={"csrf": csrf})
        assert r.status_code == 200 and "deactivated" in r.text and not logged_in(doctor)
        r = admin.post(f"/admin/users/{name}/deactivate", data={})
        assert r.status_code == 403  # CSRF
        r = admin.post(f"/admin/users/{name}/activate", data={"csrf": csrf})
        assert r.status_code == 200 and "reactivated" in r.text
        r = admin.post(f"/admin/users/{name}/password", data={"csrf": csrf, "password": "letmein12345"})
        assert r.status_code == 422 and "common" in r.text
        r = admin.post(f"/admin/users/{name}/password", data={"csrf": csrf, "password": NEW_PASSWORD})
        assert r.status_code == 200 and "password reset" in r.text
        assert login(doctor, name, NEW_PASSWORD).status_code == 303 and logged_in(doctor)
        r = admin.post(f"/admin/users/{name}/revoke", data={"csrf": csrf})
        assert r.status_code == 200 and "1 session(s) ended" in r.text and not logged_in(doctor)


def test_the_account_page_changes_your_password(server: Server) -> None:
    name = server.add("dr-own-page")
    with server.browser("127.0.0.18") as browser:
        assert login(browser, name).status_code == 303
        csrf = page_csrf(browser, "/account")
        form = {"csrf": csrf, "current_password": PASSWORD, "new_password": NEW_PASSWORD}
        r = browser.post("/account/password", data={**form, "confirm_password": "something else entirely"})
        assert r.status_code == 422 and "differ" in r.text
        r = browser.post("/account/password", data={**form, "confirm_password": NEW_PASSWORD})
        assert r.status_code == 200 and "Password changed" in r.text and logged_in(browser)


def covidscan(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covidscan", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_users_commands_deactivate_passwd_activate_and_revoke_a_live_account(server: Server) -> None:
    name = server.add("dr-cli")
    where = ["--data-dir", str(server.data_dir), "--database-url", server.database_url]
    with server.browser("127.0.0.19") as browser:
        assert login(browser, name).status_code == 303
        off = covidscan("users", "deactivate", name, *where)
        assert off.returncode == 0, off.stderr
        assert "deactivated" in off.stdout and "1 session(s)" in off.stdout
        assert not logged_in(browser)
        assert covidscan("users", "activate", name, *where).returncode == 0
        weak = covidscan("users", "passwd", name, *where, "--password-stdin", stdin="password1234\n")
        assert weak.returncode == 2 and "common" in weak.stderr
        done = covidscan("users", "passwd", name, *where, "--password-stdin", stdin=NEW_PASSWORD + "\n")
        assert done.returncode == 0, done.stderr
        assert login(browser, name, NEW_PASSWORD).status_code == 303
        revoked = covidscan("users", "revoke", name, *where)
        assert revoked.returncode == 0 and "1 session(s)" in revoked.stdout and not logged_in(browser)
        unknown = covidscan("users", "deactivate", "nobody", *where)
        assert unknown.returncode == 2 and "no user 'nobody'" in unknown.stderr
    actions = audit_actions(server, f"user:{name}")
    assert actions[-4:] == ["user_deactivate", "user_activate", "password_reset", "access_revoke"]


def test_migration_0003_keeps_sessions_and_failures_and_goes_back_down(empty_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect, text

    from covidscan.service.db import Database
    from covidscan.service.models import Base

    db = Database(empty_url)
    _alembic(db, "0002")
    at, later = "2026-01-01 10:00:00", "2026-01-01 22:00:00"
    with db.engine.begin() as conn:  # a service as 0002 left it: a live session and a failed login
        conn.execute(text(
            f"INSERT INTO users (id, name, role, active, created_at) VALUES (1, 'dr', 'doctor', true, '{at}')"
        ))
        conn.execute(text(
            "INSERT INTO web_sessions (id_hash, user_id, csrf_token, created_at, expires_at) VALUES "
            f"('{'a' * 64}', 1, 'c', '{at}', '{later}')"
        ))
        conn.execute(text(f"INSERT INTO login_failures (id, name, at) VALUES (1, 'dr', '{at}')"))
    _alembic(db, "head")
    with db.engine.connect() as conn:
        seen, created = conn.execute(text("SELECT last_seen_at, created_at FROM web_sessions")).one()
        assert seen == created  # the idle clock of an old session starts at its creation
        row = conn.execute(text("SELECT name, address, device, refused FROM login_failures")).one()
        assert tuple(row) == ("dr", None, None, False)
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    _alembic(db, "0002", down=True)
    with db.engine.connect() as conn:
        assert not inspect(conn).has_table("known_devices")
        assert "last_seen_at" not in {c["name"] for c in inspect(conn).get_columns("web_sessions")}
    db.dispose()
