"""The schema as SQLAlchemy 2.0 typed models. Migrations in `migrations/versions` must match.

Read it with sqlite3: every table and column name says what it holds. The empty string in
rollouts.source_word / target_word is the no-steering sentinel (see patchdb.experiments).
"""

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware UTC now; every time stamp in the store comes from here."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model: Mapped[str] = mapped_column(String(500))
    model_revision: Mapped[str | None] = mapped_column(String(200))
    dtype: Mapped[str] = mapped_column(String(20))
    steer_layer: Mapped[int] = mapped_column(Integer)
    strength: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float)
    top_k: Mapped[int | None] = mapped_column(Integer)  # NULL until the first generate run
    top_p: Mapped[float | None] = mapped_column(Float)
    prompt_text: Mapped[str | None] = mapped_column(Text)
    injection_start: Mapped[int | None] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("sweep_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    source_steering: Mapped[str] = mapped_column(String(20))
    target_steering: Mapped[str] = mapped_column(String(20))
    pairs: Mapped[bool] = mapped_column(Boolean)
    detection_grader: Mapped[str] = mapped_column(String(40))


class ConceptVector(Base):
    __tablename__ = "concept_vectors"
    __table_args__ = (UniqueConstraint("model", "layer", "word", "recipe"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(500))
    layer: Mapped[int] = mapped_column(Integer)
    word: Mapped[str] = mapped_column(String(200))
    recipe: Mapped[str] = mapped_column(String(200))
    dimension: Mapped[int] = mapped_column(Integer)
    norm: Mapped[float] = mapped_column(Float)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StageRun(Base):
    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(String(40))
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"))
    arguments: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(String(255))
    # runs.this_machine(): where `pid` names this run's process (None: unknown, never looked at)
    machine: Mapped[str | None] = mapped_column(String(100))
    pid: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class Rollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (
        UniqueConstraint("experiment_id", "patch_layer", "source_word", "target_word", "sample_index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    patch_layer: Mapped[int] = mapped_column(Integer)
    source_word: Mapped[str] = mapped_column(String(200))
    target_word: Mapped[str] = mapped_column(String(200))
    sample_index: Mapped[int] = mapped_column(Integer)
    answer: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    stage_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("stage_runs.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JudgeConfig(Base):
    __tablename__ = "judge_configs"
    __table_args__ = (UniqueConstraint("model", "reasoning", "template_version", "backend",
                                       "verdict_mode", name="uq_judge_configs_identity"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(500))
    reasoning: Mapped[str] = mapped_column(String(40))
    template_version: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(40))
    # "last-word" (the reply's last word) or "logprobs" (P(YES) vs P(NO) after the reasoning)
    verdict_mode: Mapped[str] = mapped_column(String(20), default="last-word",
                                              server_default="last-word")
    templates_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (UniqueConstraint("rollout_id", "grader", "judge_config_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    grader: Mapped[str] = mapped_column(String(40))
    judge_config_id: Mapped[int] = mapped_column(ForeignKey("judge_configs.id", ondelete="CASCADE"))
    verdict: Mapped[bool | None] = mapped_column(Boolean)
    p_yes: Mapped[float | None] = mapped_column(Float)  # logprobs mode: P(YES) over YES and NO
    # the reply reached the judge's token cap before it ended (finish reason "length")
    cut_off: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    raw_reply: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[float | None] = mapped_column(Float)
    latency_s: Mapped[float | None] = mapped_column(Float)
    stage_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("stage_runs.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JudgeCacheEntry(Base):
    """Replies kept by `judge --cache`, keyed by a hash of model, settings and rendered prompt."""

    __tablename__ = "judge_cache"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64), unique=True)
    reply_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Label(Base):
    """A person's YES/NO answer to one grader's question about one rollout: the ground truth
    that `calibrate` measures judge configs against."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("rollout_id", "grader", "labeler"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    grader: Mapped[str] = mapped_column(String(40))
    labeler: Mapped[str] = mapped_column(String(200))
    label: Mapped[bool] = mapped_column(Boolean)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JudgeBatch(Base):
    """A batch job of judge calls sent to a provider's batch API by `judge --batch`. Live (its
    keys are never submitted again) until collected_at is set; migration 0006 explains state."""

    __tablename__ = "judge_batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    judge_config_id: Mapped[int] = mapped_column(ForeignKey("judge_configs.id", ondelete="CASCADE"))
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"))
    base_url: Mapped[str] = mapped_column(String(500))  # any password in it hidden
    provider_batch_id: Mapped[str | None] = mapped_column(String(200))
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    output_file_id: Mapped[str | None] = mapped_column(String(200))
    error_file_id: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20))
    requests: Mapped[int] = mapped_column(Integer)
    completed: Mapped[int | None] = mapped_column(Integer)  # the provider's request counts
    failed: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    cost: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    collected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stage_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("stage_runs.id", ondelete="SET NULL")
    )


class JudgeBatchKey(Base):
    """One (rollout, grader, judge config) key a judge batch holds."""

    __tablename__ = "judge_batch_keys"
    __table_args__ = (
        UniqueConstraint("batch_id", "rollout_id", "grader"),
        Index("ix_judge_batch_keys_key", "rollout_id", "grader", "judge_config_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("judge_batches.id", ondelete="CASCADE"))
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    grader: Mapped[str] = mapped_column(String(40))
    judge_config_id: Mapped[int] = mapped_column(ForeignKey("judge_configs.id", ondelete="CASCADE"))


class Readout(Base):
    """The first-token readout of one unit: the model's next-token distribution after the
    prefill (no sampling, no judge). One row per unit and question, not per sample; question ''
    is the sweep's trial question, any other text an unrelated question (the yes-bias control).
    Migration 0008 explains the columns."""

    __tablename__ = "readouts"
    __table_args__ = (
        UniqueConstraint("experiment_id", "patch_layer", "source_word", "target_word", "question",
                         name="uq_readouts_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    patch_layer: Mapped[int] = mapped_column(Integer)
    source_word: Mapped[str] = mapped_column(String(200))
    target_word: Mapped[str] = mapped_column(String(200))
    question: Mapped[str] = mapped_column(String(500))
    p_yes: Mapped[float] = mapped_column(Float)
    p_no: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)  # nats, over the whole vocabulary
    top_token: Mapped[str] = mapped_column(Text)  # the likeliest first token, decoded
    stage_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("stage_runs.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JudgeLease(Base):
    """A live judge run's claim on one (rollout, grader, judge config) key: other runs leave the
    key alone until the claim's run writes it, lets it go, dies or lets it expire (migration 0007)."""

    __tablename__ = "judge_leases"
    __table_args__ = (UniqueConstraint("rollout_id", "grader", "judge_config_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    grader: Mapped[str] = mapped_column(String(40))
    judge_config_id: Mapped[int] = mapped_column(ForeignKey("judge_configs.id", ondelete="CASCADE"))
    stage_run_id: Mapped[int] = mapped_column(
        ForeignKey("stage_runs.id", ondelete="CASCADE"), index=True
    )
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
