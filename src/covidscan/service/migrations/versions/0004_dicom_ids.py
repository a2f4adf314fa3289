"""DICOM in: each case image's DICOM identifiers, and the instances the DICOM listener holds until their
series is complete.

``case_images`` gains the Study, Series and SOP Instance UIDs and the SOP Class UID of a DICOM file (NULL
for other images, and for images stored before this revision: their files are not read here, so DICOMweb
lists only what arrives from now on). ``dicom_pending`` holds instances received by C-STORE whose series
is still arriving.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 17:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("case_images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("series_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("sop_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("sop_class_uid", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_case_images_study_uid"), ["study_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_case_images_sop_uid"), ["sop_uid"], unique=False)
    op.create_table(
        "dicom_pending",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_uid"),
    )
    with op.batch_alter_table("dicom_pending", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dicom_pending_series_uid"), ["series_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dicom_pending", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dicom_pending_series_uid"))
    op.drop_table("dicom_pending")
    with op.batch_alter_table("case_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_case_images_sop_uid"))
        batch_op.drop_index(batch_op.f("ix_case_images_study_uid"))
        batch_op.drop_column("sop_class_uid")
        batch_op.drop_column("sop_uid")
        batch_op.drop_column("series_uid")
        batch_op.drop_column("study_uid")
