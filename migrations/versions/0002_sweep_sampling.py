"""sweeps record how they were sampled: top_k and top_p

Both are NULL until the first generate run resolves them (the sweep config's own values, else
the model's generation config, else Hugging Face's defaults) and writes them before any
rollout. top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sweeps", sa.Column("top_k", sa.Integer(), nullable=True))
    op.add_column("sweeps", sa.Column("top_p", sa.Float(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35): a batch rebuild of sweeps would break the views
    # that read it (rollouts_readable) when the rebuilt table is renamed back.
    op.drop_column("sweeps", "top_p")
    op.drop_column("sweeps", "top_k")
