"""human labels

One row per (rollout, grader, labeler): a person's YES/NO answer to the grader's question about
the rollout's answer. `patchdb label` writes them; `patchdb calibrate` and `report --corrected`
read them. A label goes with its rollout (ON DELETE CASCADE).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("grader", sa.String(length=40), nullable=False),
        sa.Column("labeler", sa.String(length=200), nullable=False),
        sa.Column("label", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_labels_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint(
            "rollout_id", "grader", "labeler", name=op.f("uq_labels_rollout_id_grader_labeler")
        ),
    )


def downgrade() -> None:
    op.drop_table("labels")
