"""The accounts API: who you are and your own password; for admins the accounts, deactivation,
reactivation, revoking tokens with sessions and password resets. Every change is audited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy import select

from covidscan.service import accounts
from covidscan.service.api import ERRORS
from covidscan.service.auth import Revoked
from covidscan.service.deps import AdminUser, CurrentUser, SessionDep, SessionRoute, client_of
from covidscan.service.models import User
from covidscan.service.schemas import AccessChanged, ErrorBody, PasswordChangeIn, PasswordIn, UserOut

router = APIRouter(
    route_class=SessionRoute,
    prefix="/api/v1",
    tags=["accounts"],
    responses={**ERRORS, 429: {"model": ErrorBody}},
)
UserName = Annotated[str, Path(max_length=64, description="The account's name")]


def _changed(user: User, revoked: Revoked) -> AccessChanged:
    return AccessChanged(
        user=UserOut.from_user(user), tokens_revoked=revoked.tokens, sessions_ended=revoked.sessions
    )


@router.get("/me")
def get_me(who: CurrentUser) -> UserOut:
    """The account you are authenticated as."""
    return UserOut.from_user(who.user)


@router.post("/me/password")
def post_my_password(
    request: Request, db: SessionDep, who: CurrentUser, body: PasswordChangeIn
) -> AccessChanged:
    """Change your password: the current one is required (403 ``wrong_password``; repeated failures are
    throttled like logins, 429 ``login_throttled`` with Retry-After), the new one must pass the policy (422
    ``weak_password``: at least 12 characters, not a common password). Your other sessions end."""
    revoked = accounts.change_own_password(
        db, who.user, body.current_password, body.new_password, client_of(request), who.session
    )
    return _changed(who.user, revoked)


@router.get("/users")
def get_users(db: SessionDep, who: AdminUser) -> list[UserOut]:
    """Every account, by name; admins only."""
    return [UserOut.from_user(u) for u in db.scalars(select(User).order_by(User.name))]


@router.post("/users/{name}/deactivate")
def post_deactivate(db: SessionDep, who: AdminUser, name: UserName) -> AccessChanged:
    """Deactivate an account: it cannot log in, and its API tokens and browser sessions stop working now
    (409 ``last_admin`` for the last active admin)."""
    return _changed(*accounts.deactivate(db, name, actor=who.user.name))


@router.post("/users/{name}/activate")
def post_activate(db: SessionDep, who: AdminUser, name: UserName) -> AccessChanged:
    """Reactivate an account; its old tokens and sessions stay revoked."""
    return _changed(*accounts.reactivate(db, name, actor=who.user.name))


@router.post("/users/{name}/revoke")
def post_revoke(db: SessionDep, who: AdminUser, name: UserName) -> AccessChanged:
    """Revoke every API token and end every browser session of an account."""
    return _changed(*accounts.revoke(db, name, actor=who.user.name))


@router.post("/users/{name}/password")
def post_password_reset(db: SessionDep, who: AdminUser, name: UserName, body: PasswordIn) -> AccessChanged:
    """Set an account's password (an admin's reset; 422 ``weak_password`` if the policy refuses it); the
    account's browser sessions end."""
    return _changed(*accounts.reset_password(db, name, body.password, actor=who.user.name))
