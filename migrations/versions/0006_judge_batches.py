"""judge batches: the batch jobs `judge --batch` submitted and the judgment keys each holds

judge_batches has one row per batch job sent to a provider's batch API. The row is written
before anything is uploaded (state "preparing"), gets its input file id once the upload
returns ("uploaded") and the provider's batch id once the batch is created; after that, state
is the provider's status (validating, in_progress, finalizing, cancelling, then completed,
failed, expired or cancelled). collected_at is set once the batch's results were written as
judgments: until then the batch is live and its keys are never submitted again. base_url is the
API it went to, with any password in it hidden; no key is ever stored.

judge_batch_keys names the (rollout, grader, judge config) keys a batch holds; the request's
custom_id is built from the same three numbers.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "judge_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("judge_config_id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=True),
        sa.Column("base_url", sa.String(length=500), nullable=False),
        sa.Column("provider_batch_id", sa.String(length=200), nullable=True),
        sa.Column("input_file_id", sa.String(length=200), nullable=True),
        sa.Column("output_file_id", sa.String(length=200), nullable=True),
        sa.Column("error_file_id", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=True),
        sa.Column("failed", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cost", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stage_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["judge_config_id"], ["judge_configs.id"],
            name=op.f("fk_judge_batches_judge_config_id_judge_configs"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["sweeps.id"],
            name=op.f("fk_judge_batches_sweep_id_sweeps"), ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["stage_run_id"], ["stage_runs.id"],
            name=op.f("fk_judge_batches_stage_run_id_stage_runs"), ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judge_batches")),
    )
    op.create_table(
        "judge_batch_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("grader", sa.String(length=40), nullable=False),
        sa.Column("judge_config_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["judge_batches.id"],
            name=op.f("fk_judge_batch_keys_batch_id_judge_batches"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"],
            name=op.f("fk_judge_batch_keys_rollout_id_rollouts"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["judge_config_id"], ["judge_configs.id"],
            name=op.f("fk_judge_batch_keys_judge_config_id_judge_configs"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judge_batch_keys")),
        sa.UniqueConstraint(
            "batch_id", "rollout_id", "grader",
            name=op.f("uq_judge_batch_keys_batch_id_rollout_id_grader"),
        ),
    )
    # "is this key in a live batch?" is asked for every pending call
    op.create_index("ix_judge_batch_keys_key", "judge_batch_keys",
                    ["rollout_id", "grader", "judge_config_id"])


def downgrade() -> None:
    op.drop_index("ix_judge_batch_keys_key", table_name="judge_batch_keys")
    op.drop_table("judge_batch_keys")
    op.drop_table("judge_batches")
