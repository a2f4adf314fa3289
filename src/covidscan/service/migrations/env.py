"""Alembic environment: migrations always run on the connection handed over by ``covidscan.service.db``."""

from __future__ import annotations

from alembic import context

from covidscan.service.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
