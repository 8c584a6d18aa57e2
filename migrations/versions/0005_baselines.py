"""baselines: unpatched rollouts at patch_layer -1, kept out of layer_rates, shown by baseline_rates

A baseline is a target condition generated with no patch at all: the target's steering (or none)
and nothing copied from a source run. Its rollouts live in the rollouts table of the experiment
whose target condition it is, with two sentinels: patch_layer -1 (no decoder layer has that index)
and source_word '' (no source run). NULL would not do for either, because the unique key and
ON CONFLICT treat NULLs as distinct. The baseline of "no steering" (steered_to_unsteered's target)
is the no-injection control: its detection rate is the false-positive rate.

No table changes. The views are recreated: layer_rates leaves patch_layer -1 out (so a rate
curve never mixes in its reference), and the new view baseline_rates has one row per
(sweep, experiment, target, judge config) with the same n, n_scored and rate rule.
rollouts_readable and sample_scores keep every rollout (patch_layer -1 marks a baseline there).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The views are written out in full (the score rule is 0001's layer_rates): SQL text here is
# constant, never assembled from values.
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
        WHERE r.patch_layer <> -1
        GROUP BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

BASELINE_RATES = """
    CREATE VIEW baseline_rates AS
    SELECT s.name AS sweep, e.name AS experiment, e.pairs, e.detection_grader, g.target_word,
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
        WHERE r.patch_layer = -1
        GROUP BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""

# 0001's layer_rates, for the downgrade.
LAYER_RATES_0001 = """
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
        GROUP BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, c.judge_config_id
    ) g
    JOIN experiments e ON e.id = g.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS layer_rates")
    op.execute(LAYER_RATES)
    op.execute(BASELINE_RATES)


def downgrade() -> None:
    # Earlier revisions know no baselines: their rollouts (and, by cascade, their judgments and
    # labels) go, so the old layer_rates cannot show a layer -1.
    op.execute("DROP VIEW IF EXISTS baseline_rates")
    op.execute("DROP VIEW IF EXISTS layer_rates")
    op.execute("DELETE FROM rollouts WHERE patch_layer = -1")
    op.execute(LAYER_RATES_0001)
