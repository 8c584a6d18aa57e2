"""judge leases: which live judge run is sending which judgment key right now

One row per (rollout, grader, judge config) key that a live `patchdb judge` run has claimed and
not yet written: workers on one store (processes on one machine, or machines on one PostgreSQL
store) claim pending keys a page at a time here, in a write transaction, and leave keys another
run holds alone, so every judge call is paid once. stage_run_id is the run that holds the key;
expires_at is pushed forward while the run works (the database's clock on PostgreSQL). The row
goes in the transaction that writes the key's judgment, or when the run lets the key go. A
lease is dead, and the key free again, once it expires or its run is no longer running (a dead
pid on this host, a heartbeat over 60 s old, or a finished run). Leases are working state: they
are never merged or exported.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "judge_leases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("grader", sa.String(length=40), nullable=False),
        sa.Column("judge_config_id", sa.Integer(), nullable=False),
        sa.Column("stage_run_id", sa.Integer(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"],
            name=op.f("fk_judge_leases_rollout_id_rollouts"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["judge_config_id"], ["judge_configs.id"],
            name=op.f("fk_judge_leases_judge_config_id_judge_configs"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stage_run_id"], ["stage_runs.id"],
            name=op.f("fk_judge_leases_stage_run_id_stage_runs"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judge_leases")),
        sa.UniqueConstraint(
            "rollout_id", "grader", "judge_config_id",
            name=op.f("uq_judge_leases_rollout_id_grader_judge_config_id"),
        ),
    )
    # a run renews and lets go of its own leases by stage_run_id
    op.create_index(op.f("ix_judge_leases_stage_run_id"), "judge_leases", ["stage_run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_judge_leases_stage_run_id"), table_name="judge_leases")
    op.drop_table("judge_leases")
