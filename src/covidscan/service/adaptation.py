"""The service's one training job: a challenger for a site, adapted from its champion on its signed verdicts.

The only service module that imports :mod:`covidscan.training`; the worker imports it when it picks up a
challenger (never a request handler), so serving stays free of the training code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from covidscan.errors import CovidscanError
from covidscan.service.audit import record
from covidscan.service.db import Database
from covidscan.service.models import Site, SiteRun
from covidscan.service.sites import site_verdicts_manifest
from covidscan.service.storage import BlobStore
from covidscan.training.site import Challenge, challenge

log = logging.getLogger(__name__)


def _challenge(db: Database, store: BlobStore, site_run_id: int, out: Path) -> Challenge:
    """Write the site's verdicts manifest beside ``out`` and run ``challenge`` from the site run's parent."""
    with db.session() as s:
        site_run = s.get(SiteRun, site_run_id)
        site = s.get(Site, site_run.site_id)
        manifest = site_verdicts_manifest(s, store, site, since=site.run_since)
        parent = site_run.parent_run
    out.parent.mkdir(parents=True, exist_ok=True)
    signed = out.parent / f"{out.name}.verdicts.csv"
    signed.write_text(manifest, encoding="utf-8")
    return challenge(parent, signed, out, overwrite=True)


def train_challenger(db: Database, store: BlobStore, site_run_id: int, out: Path) -> SiteRun:
    """Adapt the site run's parent to its site's signed verdicts into ``out`` and compare the two out of
    fold; the site run ends ``candidate`` (with the comparison) or ``failed`` (with the reason) -- whatever
    goes wrong, never ``training`` while its worker lives on.

    No transaction is held while training: the verdicts are exported first, the result stored after.
    """
    try:
        result, error = _challenge(db, store, site_run_id, out), None
    except CovidscanError as exc:  # too few patients of a class, an unreadable parent: said on the site page
        log.warning("challenger %d failed: %s", site_run_id, exc)
        result, error = None, str(exc)
    except Exception as exc:  # a bug, a full disk, out of memory: the site page says so
        log.exception("challenger %d crashed", site_run_id)
        result, error = None, f"training crashed ({type(exc).__name__}: {exc}); see the server log"
    with db.session() as s:
        site_run = s.get(SiteRun, site_run_id)
        if result is None:
            site_run.state, site_run.error, site_run.comparison = "failed", error, None
        else:
            site_run.state, site_run.comparison = "candidate", result.to_dict()
            site_run.n_patients = result.n_patients or site_run.n_patients
        record(s, "challenger_trained", actor=None, target=f"site:{site_run.site_id}", site_run=site_run_id,
               state=site_run.state, better=None if result is None else result.better, error=error)
        s.flush()
        s.expunge(site_run)
    return site_run
