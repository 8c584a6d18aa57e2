"""readouts: the first-token readout of each unit, and the random-vector control's rates

A readout is what the model's next-token distribution says right after a unit's prefill, with no
sampling and no judge: p_yes and p_no are the probability masses of the YES-like and NO-like
first tokens (the logprobs verdict mode's token rule), over the model's own softmax at
temperature 1 before any top-k or top-p cut; entropy is that whole distribution's, in nats;
top_token is the likeliest first token, decoded. It is deterministic, so there is one row per
unit, never per sample, keyed like the rollouts' units plus the question asked: question '' is
the sweep's own trial question, any other text an unrelated yes/no question asked in its place
(the unrelated_questions control). NULL would not do for the trial question: the unique key
treats NULLs as distinct.

Two sentinels, as in the rollouts: patch_layer -1 is a unit with no patch (a baseline; with
source '' and target '' also each experiment's no-injection arm of the unrelated questions), and
patch_layer -2 is the random_vector control: the target steered with a random direction scaled
to the norm of its word's concept vector (stored in concept_vectors under its own recipe), no
patch. Random-vector rollouts live in the rollouts table at patch_layer -2.

Views: readouts_readable (the readouts with names); yes_bias (per unit, the mean over the
unrelated questions of P(yes) at the unit minus P(yes) with nothing injected, the yes-bias
index); control_rates (the random-vector rates, shaped like baseline_rates). layer_rates is
recreated to leave out every sentinel layer (patch_layer >= 0), not only -1.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Views are written out in full as constant SQL (never assembled from values).
READOUTS_READABLE = """
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

# Each unrelated question's P(yes) at the unit, less the same question's P(yes) at the
# experiment's no-injection arm (patch_layer -1, source '', target ''), averaged over questions.
YES_BIAS = """
    CREATE VIEW yes_bias AS
    SELECT s.name AS sweep, e.name AS experiment, g.patch_layer, g.source_word, g.target_word,
           CASE WHEN g.source_word = '' THEN '(none)' ELSE g.source_word END AS source,
           CASE WHEN g.target_word = '' THEN '(none)' ELSE g.target_word END AS target,
           g.n_questions, g.p_yes, g.p_yes_none, g.yes_bias
    FROM (
        SELECT u.experiment_id, u.patch_layer, u.source_word, u.target_word,
               COUNT(*) AS n_questions, AVG(u.p_yes) AS p_yes, AVG(n.p_yes) AS p_yes_none,
               AVG(u.p_yes - n.p_yes) AS yes_bias
        FROM readouts u
        JOIN readouts n ON n.experiment_id = u.experiment_id AND n.patch_layer = -1
                       AND n.source_word = '' AND n.target_word = ''
                       AND n.question = u.question
        WHERE u.question <> ''
        GROUP BY u.experiment_id, u.patch_layer, u.source_word, u.target_word
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

CONTROL_RATES = """
    CREATE VIEW control_rates AS
    SELECT s.name AS sweep, e.name AS experiment, e.pairs, e.detection_grader,
           'random_vector' AS control, g.target_word,
           CASE WHEN g.target_word = '' THEN '(none)' ELSE g.target_word END AS target,
           g.judge_config_id, g.n, g.n_scored, g.rate
    FROM (
        SELECT r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id,
               COUNT(*) AS n,
               COUNT(CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL ELSE 1 END)
                   AS n_scored,
               AVG(CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL
                        WHEN c.verdict AND d.verdict THEN 1.0 ELSE 0.0 END) AS rate
        FROM rollouts r
        JOIN experiments ge ON ge.id = r.experiment_id
        LEFT JOIN judgments c ON c.rollout_id = r.id AND c.grader = 'coherence'
        LEFT JOIN judgments d ON d.rollout_id = r.id AND d.grader = ge.detection_grader
                              AND d.judge_config_id = c.judge_config_id
        WHERE r.patch_layer = -2
        GROUP BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

# 0005's layer_rates with every sentinel layer left out.
LAYER_RATES = """
    CREATE VIEW layer_rates AS
    SELECT s.name AS sweep, e.name AS experiment, e.pairs, g.patch_layer,
           g.source_word, g.target_word,
           CASE WHEN g.source_word = '' THEN '(none)' ELSE g.source_word END AS source,
           CASE WHEN g.target_word = '' THEN '(none)' ELSE g.target_word END AS target,
           g.judge_config_id, g.n, g.n_scored, g.rate
    FROM (
        SELECT r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id,
               COUNT(*) AS n,
               COUNT(CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL ELSE 1 END)
                   AS n_scored,
               AVG(CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL
                        WHEN c.verdict AND d.verdict THEN 1.0 ELSE 0.0 END) AS rate
        FROM rollouts r
        JOIN experiments ge ON ge.id = r.experiment_id
        LEFT JOIN judgments c ON c.rollout_id = r.id AND c.grader = 'coherence'
        LEFT JOIN judgments d ON d.rollout_id = r.id AND d.grader = ge.detection_grader
                              AND d.judge_config_id = c.judge_config_id
        WHERE r.patch_layer >= 0
        GROUP BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

# 0005's layer_rates, for the downgrade.
LAYER_RATES_0005 = """
    CREATE VIEW layer_rates AS
    SELECT s.name AS sweep, e.name AS experiment, e.pairs, g.patch_layer,
           g.source_word, g.target_word,
           CASE WHEN g.source_word = '' THEN '(none)' ELSE g.source_word END AS source,
           CASE WHEN g.target_word = '' THEN '(none)' ELSE g.target_word END AS target,
           g.judge_config_id, g.n, g.n_scored, g.rate
    FROM (
        SELECT r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id,
               COUNT(*) AS n,
               COUNT(CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL ELSE 1 END)
                   AS n_scored,
               AVG(CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL
                        WHEN c.verdict AND d.verdict THEN 1.0 ELSE 0.0 END) AS rate
        FROM rollouts r
        JOIN experiments ge ON ge.id = r.experiment_id
        LEFT JOIN judgments c ON c.rollout_id = r.id AND c.grader = 'coherence'
        LEFT JOIN judgments d ON d.rollout_id = r.id AND d.grader = ge.detection_grader
                              AND d.judge_config_id = c.judge_config_id
        WHERE r.patch_layer <> -1
        GROUP BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""


def upgrade() -> None:
    op.create_table(
        "readouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("patch_layer", sa.Integer(), nullable=False),
        sa.Column("source_word", sa.String(length=200), nullable=False),
        sa.Column("target_word", sa.String(length=200), nullable=False),
        sa.Column("question", sa.String(length=500), nullable=False),
        sa.Column("p_yes", sa.Float(), nullable=False),
        sa.Column("p_no", sa.Float(), nullable=False),
        sa.Column("entropy", sa.Float(), nullable=False),
        sa.Column("top_token", sa.Text(), nullable=False),
        sa.Column("stage_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.id"],
            name=op.f("fk_readouts_experiment_id_experiments"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stage_run_id"], ["stage_runs.id"],
            name=op.f("fk_readouts_stage_run_id_stage_runs"), ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_readouts")),
        sa.UniqueConstraint(
            "experiment_id", "patch_layer", "source_word", "target_word", "question",
            name="uq_readouts_key",
        ),
    )
    op.execute("DROP VIEW IF EXISTS layer_rates")
    op.execute(LAYER_RATES)
    op.execute(READOUTS_READABLE)
    op.execute(YES_BIAS)
    op.execute(CONTROL_RATES)


def downgrade() -> None:
    # Earlier revisions know no random-vector control: its rollouts (and, by cascade, their
    # judgments and labels) go, so the old layer_rates cannot show a layer -2.
    op.execute("DROP VIEW IF EXISTS control_rates")
    op.execute("DROP VIEW IF EXISTS yes_bias")
    op.execute("DROP VIEW IF EXISTS readouts_readable")
    op.execute("DROP VIEW IF EXISTS layer_rates")
    op.execute("DELETE FROM rollouts WHERE patch_layer = -2")
    op.execute(LAYER_RATES_0005)
    op.drop_table("readouts")
