"""Sites: the sites table, every case's site, reader-first reads, shift checks, per-site runs, features.

Existing cases get one site per submitter account, named after the account (the default rule for new
cases), so ``cases.site_id`` is NOT NULL from here on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


@contextmanager
def _foreign_keys_off_on_sqlite() -> Iterator[None]:
    """Rebuild tables on SQLite with foreign-key enforcement off, as SQLite's ALTER TABLE guide says.

    Changing a column of ``cases`` rebuilds the table on SQLite (copy, drop, rename); with enforcement on,
    the drop counts every image, job and review as orphaned and the commit fails. The pragma only takes
    effect outside a transaction, so the block commits what came before, runs in its own transaction,
    checks every foreign key before committing and turns enforcement back on. (Alembic stamps the new
    revision just after, in the next transaction.)
    """
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        yield
        return

    def switch(end: str, enforce: str) -> None:
        conn.exec_driver_sql(end)
        conn.exec_driver_sql(f"PRAGMA foreign_keys = {enforce}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    switch("COMMIT", "OFF")
    try:
        yield
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
        if broken:
            raise RuntimeError(f"migration 0002 would leave rows without their parent: {broken[:5]}")
    except BaseException:
        switch("ROLLBACK", "ON")
        raise
    switch("COMMIT", "ON")


def _backfill_sites() -> None:
    """One site per account that submitted cases, named after it; each case points at its submitter's."""
    conn = op.get_bind()
    sites = sa.table(
        "sites",
        sa.column("name", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("status", sa.String),
        sa.column("status_since", sa.DateTime(timezone=True)),
    )
    names = conn.execute(
        sa.text("SELECT name FROM users WHERE id IN (SELECT submitted_by FROM cases) ORDER BY id")
    ).scalars()
    now = datetime.now(timezone.utc)
    rows = [{"name": name, "created_at": now, "status": "new", "status_since": now} for name in names]
    if rows:
        op.bulk_insert(sites, rows)
    conn.execute(
        sa.text(
            "UPDATE cases SET site_id = (SELECT sites.id FROM sites JOIN users ON users.name = sites.name "
            "WHERE users.id = cases.submitted_by)"
        )
    )


def upgrade() -> None:
    with _foreign_keys_off_on_sqlite():
        _upgrade()


def _upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reader_first", sa.Boolean(), nullable=True),
        sa.Column("rules", sa.JSON(), nullable=True),
        sa.Column("active_run", sa.Text(), nullable=True),
        sa.Column("run_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("merged_into_id", sa.Integer(), nullable=True),
        sa.Column("local", sa.JSON(), nullable=True),
        sa.Column("shift", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["merged_into_id"],
            ["sites.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("site_id", sa.Integer(), nullable=True))
    _backfill_sites()
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.alter_column("site_id", existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key("fk_cases_site_id_sites", "sites", ["site_id"], ["id"])
        batch_op.create_index(batch_op.f("ix_cases_site_id"), ["site_id"], unique=False)

    with op.batch_alter_table("case_images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("features_sha256", sa.String(length=64), nullable=True))

    op.create_table(
        "first_reads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("reader_id", sa.Integer(), nullable=False),
        sa.Column("finding", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["cases.id"],
        ),
        sa.ForeignKeyConstraint(
            ["reader_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("case_id", "reader_id"),
    )
    with op.batch_alter_table("first_reads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_first_reads_case_id"), ["case_id"], unique=False)

    op.create_table(
        "site_shift_checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("run", sa.Text(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("auc", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("alarm", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["sites.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("site_shift_checks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_site_shift_checks_site_id"), ["site_id"], unique=False)

    op.create_table(
        "site_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("run", sa.Text(), nullable=False),
        sa.Column("parent_run", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("comparison", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("promoted_by", sa.Integer(), nullable=True),
        sa.Column("n_patients", sa.Integer(), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(
            ["promoted_by"],
            ["users.id"],
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["sites.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("site_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_site_runs_site_id"), ["site_id"], unique=False)


def downgrade() -> None:
    with _foreign_keys_off_on_sqlite():  # dropping cases.site_id rebuilds the cases table on SQLite
        _downgrade()


def _downgrade() -> None:
    with op.batch_alter_table("site_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_site_runs_site_id"))
    op.drop_table("site_runs")
    with op.batch_alter_table("site_shift_checks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_site_shift_checks_site_id"))
    op.drop_table("site_shift_checks")
    with op.batch_alter_table("first_reads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_first_reads_case_id"))
    op.drop_table("first_reads")
    with op.batch_alter_table("case_images", schema=None) as batch_op:
        batch_op.drop_column("features_sha256")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cases_site_id"))
        batch_op.drop_constraint("fk_cases_site_id_sites", type_="foreignkey")
        batch_op.drop_column("site_id")
    op.drop_table("sites")
