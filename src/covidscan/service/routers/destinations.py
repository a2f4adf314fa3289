"""The PACS destinations API under ``/api/v1/destinations`` (admins): where signed results are sent, and a
check that a destination answers. Every change is audit-logged."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from covidscan.service import delivery
from covidscan.service.api import ERRORS
from covidscan.service.deps import AdminUser, SessionDep, SessionRoute
from covidscan.service.errors import NotFound
from covidscan.service.models import Destination
from covidscan.service.schemas import DestinationCheckOut, DestinationIn, DestinationOut, DestinationPatch

router = APIRouter(
    route_class=SessionRoute, prefix="/api/v1/destinations", tags=["destinations"], responses=ERRORS
)


def destination_or_404(db: Session, destination_id: int) -> Destination:
    """The destination with this id; 404 otherwise."""
    dest = db.get(Destination, destination_id)
    if dest is None:
        raise NotFound(f"no destination {destination_id}; GET /api/v1/destinations lists them")
    return dest


@router.get("")
def get_destinations(db: SessionDep, who: AdminUser) -> list[DestinationOut]:
    """Every destination, by name (secrets are never shown)."""
    return [DestinationOut.from_destination(d) for d in delivery.list_destinations(db)]


@router.post("", status_code=201)
def post_destination(db: SessionDep, who: AdminUser, body: DestinationIn) -> DestinationOut:
    """Add a destination: ``kind`` dicom (C-STORE to ``host``, ``port``, ``called_ae``, from
    ``calling_ae``) or stow (STOW-RS to ``url``, optionally with a bearer token or basic login, stored as
    given). 422 ``destination_invalid`` names a field nothing can be sent to; 409
    ``destination_name_taken``."""
    return DestinationOut.from_destination(delivery.add_destination(db, body.model_dump(), who.user))


@router.patch("/{destination_id}")
def patch_destination(
    db: SessionDep, who: AdminUser, destination_id: int, body: DestinationPatch
) -> DestinationOut:
    """Change the fields given (e.g. ``{"active": false}`` stops sending to it; waiting deliveries go out
    once it is active again)."""
    dest = destination_or_404(db, destination_id)
    changes = body.model_dump(exclude_unset=True)
    return DestinationOut.from_destination(delivery.change_destination(db, dest, changes, who.user))


@router.delete("/{destination_id}", status_code=204, response_class=Response)
def delete_destination(db: SessionDep, who: AdminUser, destination_id: int) -> Response:
    """Remove a destination; the deliveries made to it keep its name, those still waiting end failed."""
    delivery.delete_destination(db, destination_or_404(db, destination_id), who.user)
    return Response(status_code=204)


@router.post("/{destination_id}/check")
def check_destination(db: SessionDep, who: AdminUser, destination_id: int) -> DestinationCheckOut:
    """Try the destination without sending anything: C-ECHO (DICOM) or a QIDO-RS search (STOW-RS). A
    destination that does not answer is ``ok: false`` with what went wrong, not an error."""
    result = delivery.check_destination(db, destination_or_404(db, destination_id), who.user)
    return DestinationCheckOut(ok=result.ok, detail=result.detail)
