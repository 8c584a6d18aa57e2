"""view names: every view that names a rollout's words calls them source_word and target_word

The tables call the words of a unit `source_word` and `target_word` ('' for no steering).
`sample_scores`, `layer_rates` and `yes_bias` show those columns, and `baseline_rates` and
`control_rates` show `target_word`, but `rollouts_readable` and `readouts_readable` showed only
`source` and `target`, so one query could not run against all of them. Both views now carry
`source_word` and `target_word` too. `source` and `target` stay in every view where they were,
unchanged (the same word, '(none)' for no steering), so queries written for them keep working.

No table changes. The two views are dropped and created again (PostgreSQL cannot add a column
in the middle of a view with CREATE OR REPLACE).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Views are written out in full as constant SQL (never assembled from values).
ROLLOUTS_READABLE = """
    CREATE VIEW rollouts_readable AS
    SELECT r.id AS rollout_id, s.name AS sweep, e.name AS experiment, r.patch_layer,
           r.source_word, r.target_word,
           CASE WHEN r.source_word = '' THEN '(none)' ELSE r.source_word END AS source,
           CASE WHEN r.target_word = '' THEN '(none)' ELSE r.target_word END AS target,
           r.sample_index, r.answer, r.n_tokens, r.finish_reason, r.seed, r.created_at
    FROM rollouts r
    JOIN experiments e ON e.id = r.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

READOUTS_READABLE = """
    CREATE VIEW readouts_readable AS
    SELECT r.id AS readout_id, s.name AS sweep, e.name AS experiment, r.patch_layer,
           r.source_word, r.target_word,
           CASE WHEN r.source_word = '' THEN '(none)' ELSE r.source_word END AS source,
           CASE WHEN r.target_word = '' THEN '(none)' ELSE r.target_word END AS target,
           CASE WHEN r.question = '' THEN '(trial)' ELSE r.question END AS question,
           r.p_yes, r.p_no, r.entropy, r.top_token, r.created_at
    FROM readouts r
    JOIN experiments e ON e.id = r.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

# 0001's rollouts_readable and 0008's readouts_readable, for the downgrade.
ROLLOUTS_READABLE_0001 = """
    CREATE VIEW rollouts_readable AS
    SELECT r.id AS rollout_id, s.name AS sweep, e.name AS experiment, r.patch_layer,
           CASE WHEN r.source_word = '' THEN '(none)' ELSE r.source_word END AS source,
           CASE WHEN r.target_word = '' THEN '(none)' ELSE r.target_word END AS target,
           r.sample_index, r.answer, r.n_tokens, r.finish_reason, r.seed, r.created_at
    FROM rollouts r
    JOIN experiments e ON e.id = r.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

READOUTS_READABLE_0008 = """
    CREATE VIEW readouts_readable AS
    SELECT r.id AS readout_id, s.name AS sweep, e.name AS experiment, r.patch_layer,
           CASE WHEN r.source_word = '' THEN '(none)' ELSE r.source_word END AS source,
           CASE WHEN r.target_word = '' THEN '(none)' ELSE r.target_word END AS target,
           CASE WHEN r.question = '' THEN '(trial)' ELSE r.question END AS question,
           r.p_yes, r.p_no, r.entropy, r.top_token, r.created_at
    FROM readouts r
    JOIN experiments e ON e.id = r.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS rollouts_readable")
    op.execute(ROLLOUTS_READABLE)
    op.execute("DROP VIEW IF EXISTS readouts_readable")
    op.execute(READOUTS_READABLE)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS readouts_readable")
    op.execute(READOUTS_READABLE_0008)
    op.execute("DROP VIEW IF EXISTS rollouts_readable")
    op.execute(ROLLOUTS_READABLE_0001)
