"""initial schema

Tables for sweeps, experiments, concept vectors, rollouts, judge configs, judgments, the judge
cache and stage runs, plus three views.

Surprising on purpose: rollouts.source_word and rollouts.target_word hold '' (the empty string)
for "no steering". A NULL there would slip past the unique key, because SQLite and PostgreSQL
treat NULLs as distinct. The views show '' as '(none)'.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "concept_vectors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("word", sa.String(length=200), nullable=False),
        sa.Column("recipe", sa.String(length=200), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concept_vectors")),
        sa.UniqueConstraint(
            "model",
            "layer",
            "word",
            "recipe",
            name=op.f("uq_concept_vectors_model_layer_word_recipe"),
        ),
    )
    op.create_table(
        "judge_cache",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("reply_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judge_cache")),
        sa.UniqueConstraint("request_hash", name=op.f("uq_judge_cache_request_hash")),
    )
    op.create_table(
        "judge_configs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("reasoning", sa.String(length=40), nullable=False),
        sa.Column("template_version", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=40), nullable=False),
        sa.Column("templates_json", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judge_configs")),
        sa.UniqueConstraint(
            "model",
            "reasoning",
            "template_version",
            "backend",
            name=op.f("uq_judge_configs_model_reasoning_template_version_backend"),
        ),
    )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("model_revision", sa.String(length=200), nullable=True),
        sa.Column("dtype", sa.String(length=20), nullable=False),
        sa.Column("steer_layer", sa.Integer(), nullable=False),
        sa.Column("strength", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("max_new_tokens", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("injection_start", sa.Integer(), nullable=True),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("name", name=op.f("uq_sweeps_name")),
    )
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("source_steering", sa.String(length=20), nullable=False),
        sa.Column("target_steering", sa.String(length=20), nullable=False),
        sa.Column("pairs", sa.Boolean(), nullable=False),
        sa.Column("detection_grader", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name=op.f("fk_experiments_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
        sa.UniqueConstraint("sweep_id", "name", name=op.f("uq_experiments_sweep_id_name")),
    )
    op.create_table(
        "stage_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=40), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=True),
        sa.Column("arguments", sa.Text(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name=op.f("fk_stage_runs_sweep_id_sweeps"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_runs")),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("patch_layer", sa.Integer(), nullable=False),
        sa.Column("source_word", sa.String(length=200), nullable=False),
        sa.Column("target_word", sa.String(length=200), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=True),
        sa.Column("finish_reason", sa.String(length=20), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("stage_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_rollouts_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_rollouts_stage_run_id_stage_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sa.UniqueConstraint(
            "experiment_id",
            "patch_layer",
            "source_word",
            "target_word",
            "sample_index",
            name=op.f("uq_rollouts_experiment_id_patch_layer_source_word_target_word_sample_index"),
        ),
    )
    op.create_table(
        "judgments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("grader", sa.String(length=40), nullable=False),
        sa.Column("judge_config_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.Boolean(), nullable=True),
        sa.Column("raw_reply", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=True),
        sa.Column("cost", sa.Float(), nullable=True),
        sa.Column("latency_s", sa.Float(), nullable=True),
        sa.Column("stage_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["judge_config_id"],
            ["judge_configs.id"],
            name=op.f("fk_judgments_judge_config_id_judge_configs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_judgments_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_judgments_stage_run_id_stage_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgments")),
        sa.UniqueConstraint(
            "rollout_id",
            "grader",
            "judge_config_id",
            name=op.f("uq_judgments_rollout_id_grader_judge_config_id"),
        ),
    )

    for statement in VIEWS:
        op.execute(statement)


# sample_scores: one row per rollout and judge config. score is coherent AND detected (detected
# being the experiment's detection grader), NULL while either verdict is missing or unparsed.
# layer_rates: the rate per (sweep, experiment, layer, source, target, judge config); rate is
# NULL, not 0, when no sample has a score. It groups on the rollouts' own key columns (the same
# score rule as sample_scores, written out) and joins the names afterwards, which keeps the
# grouping cheap at the default sweep's 473,088 judgments.
VIEWS = [
    """
    CREATE VIEW rollouts_readable AS
    SELECT r.id AS rollout_id, s.name AS sweep, e.name AS experiment, r.patch_layer,
           CASE WHEN r.source_word = '' THEN '(none)' ELSE r.source_word END AS source,
           CASE WHEN r.target_word = '' THEN '(none)' ELSE r.target_word END AS target,
           r.sample_index, r.answer, r.n_tokens, r.finish_reason, r.seed, r.created_at
    FROM rollouts r
    JOIN experiments e ON e.id = r.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
    """,
    """
    CREATE VIEW sample_scores AS
    SELECT r.id AS rollout_id, s.name AS sweep, e.name AS experiment, e.pairs,
           r.patch_layer, r.source_word, r.target_word,
           CASE WHEN r.source_word = '' THEN '(none)' ELSE r.source_word END AS source,
           CASE WHEN r.target_word = '' THEN '(none)' ELSE r.target_word END AS target,
           r.sample_index, c.judge_config_id,
           c.verdict AS coherent, d.verdict AS detected,
           CASE WHEN c.verdict IS NULL OR d.verdict IS NULL THEN NULL
                WHEN c.verdict AND d.verdict THEN 1 ELSE 0 END AS score
    FROM rollouts r
    JOIN experiments e ON e.id = r.experiment_id
    JOIN sweeps s ON s.id = e.sweep_id
    LEFT JOIN judgments c ON c.rollout_id = r.id AND c.grader = 'coherence'
    LEFT JOIN judgments d ON d.rollout_id = r.id AND d.grader = e.detection_grader
                          AND d.judge_config_id = c.judge_config_id
    """,
    """
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
    """,
]


def downgrade() -> None:
    for view in ("layer_rates", "sample_scores", "rollouts_readable"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("judgments")
    op.drop_table("rollouts")
    op.drop_table("stage_runs")
    op.drop_table("experiments")
    op.drop_table("sweeps")
    op.drop_table("judge_configs")
    op.drop_table("judge_cache")
    op.drop_table("concept_vectors")
