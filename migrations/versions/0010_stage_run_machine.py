"""stage runs record the machine their pid belongs to

A stage run's pid was looked at (to call a run crashed at once when its process is gone)
wherever the run's host name matched this machine's. Host names repeat: cloud images ship with
one name, and containers on one machine share the host's name while each has its own
processes. A live judge worker elsewhere then looked crashed, its leases were taken over, and
its calls were paid twice. `machine` holds the kernel's boot id and the run's pid namespace
(Linux; NULL elsewhere), and a run's pid is looked at only where both match this process's.
Runs recorded before this revision have none: only their heartbeat tells.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("stage_runs", sa.Column("machine", sa.String(length=100), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35), as 0002 does.
    op.drop_column("stage_runs", "machine")
