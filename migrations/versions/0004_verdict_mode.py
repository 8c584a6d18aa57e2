"""verdict modes: judge_configs.verdict_mode, judgments.p_yes and judgments.cut_off

judge_configs.verdict_mode says how the judge's verdicts were read: "last-word" (the reply's
last word, the rule every earlier row used) or "logprobs" (after the reasoning the judge is
asked for the verdict and the likelier of YES and NO as its next token decides). It joins the
judge config's natural key, so judgments read the two ways stay apart.

judgments.p_yes is P(YES), normalised over YES and NO, in logprobs mode (NULL otherwise).
judgments.cut_off is true when the judge's reply reached its token cap before it ended
(finish reason "length"). Earlier rows are marked where the stored error says so (API replies
that stayed cut off after every attempt); an earlier local (hf) reply that was cut off cannot
be told apart from an unparsed one and stays false.

On SQLite the unique key of judge_configs can only change by rebuilding the table, and
dropping the old table would cascade to judgments (foreign keys are on), so the judgments are
kept in a temporary table around the rebuild and put back with their ids.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ("model", "reasoning", "template_version", "backend")
NEW_KEY = (*OLD_KEY, "verdict_mode")
OLD_NAME = "uq_judge_configs_model_reasoning_template_version_backend"
NEW_NAME = "uq_judge_configs_identity"
CUT_OFF_ERROR = "reply not finished (finish reason 'length')%"


def _rebuild_judge_configs(change: Callable[[Any], None]) -> None:
    """Apply `change` to judge_configs in batch mode, keeping every judgment."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("CREATE TEMP TABLE judgments_0003 AS SELECT * FROM judgments")
    with op.batch_alter_table("judge_configs") as batch:
        change(batch)
    if sqlite:
        op.execute("INSERT INTO judgments SELECT * FROM judgments_0003")
        op.execute("DROP TABLE judgments_0003")


def upgrade() -> None:
    op.add_column("judgments", sa.Column("p_yes", sa.Float(), nullable=True))
    op.add_column("judgments", sa.Column("cut_off", sa.Boolean(), nullable=False,
                                         server_default=sa.false()))
    judgments = sa.table("judgments", sa.column("cut_off", sa.Boolean()),
                         sa.column("error", sa.Text()))
    op.execute(judgments.update().where(judgments.c.error.like(CUT_OFF_ERROR))
               .values(cut_off=True))

    def change(batch: Any) -> None:
        batch.add_column(sa.Column("verdict_mode", sa.String(length=20), nullable=False,
                                   server_default="last-word"))
        batch.drop_constraint(OLD_NAME, type_="unique")
        batch.create_unique_constraint(NEW_NAME, list(NEW_KEY))

    _rebuild_judge_configs(change)


def downgrade() -> None:
    # the old key cannot hold both modes of one judge: logprobs configs (and, by cascade,
    # their judgments) go
    op.execute("DELETE FROM judge_configs WHERE verdict_mode <> 'last-word'")
    op.drop_column("judgments", "cut_off")
    op.drop_column("judgments", "p_yes")

    def change(batch: Any) -> None:
        batch.drop_constraint(NEW_NAME, type_="unique")
        batch.create_unique_constraint(OLD_NAME, list(OLD_KEY))
        batch.drop_column("verdict_mode")

    _rebuild_judge_configs(change)
