"""Merging stores: copy another store's rows into this one, matched by natural keys.

Ids differ between stores, so every row is matched by what it is: a sweep by name, an
experiment by (sweep, name), a concept vector by (model, layer, word, recipe), a judge config by
(model, reasoning, template_version, backend, verdict_mode), a rollout by (sweep, experiment,
patch layer, source word, target word, sample index), a judgment by (rollout, grader, judge config), a human
label by (rollout, grader, labeler), a first-token readout by (sweep, experiment, patch layer,
source word, target word, question), a judge cache entry by its request hash, and a stage run
by (stage, host, pid, started_at). A row whose key is already here is left alone, so merging
twice changes nothing.

Rows are copied in chunks, one transaction each, with INSERT ... ON CONFLICT DO NOTHING: a
merge killed half way leaves whole chunks behind, and running it again fills in the rest.

Stage runs are copied as history, so a rollout keeps the record of the run (host, pid) that
made it; a run here whose source copy has a newer heartbeat takes its status from there.

Refused before anything is written: a sweep whose science (every [sweep] setting; [judge]
settings do not count), rendered prompt or recorded top_k / top_p differs between the stores.
A judgment is not copied when its rollout exists here with a different answer (both stores
generated that sample): it would grade an answer it never saw.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, DateTime, RowMapping, Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig, config_from_json, science_differences
from patchdb.errors import ConfigError, StoreError
from patchdb.store.models import Base
from patchdb.store.store import Store

CHUNK_ROWS = 5000
VECTOR_CHUNK_ROWS = 200  # a vector is tens of kB

TABLES = Base.metadata.tables
SWEEPS = TABLES["sweeps"]
EXPERIMENTS = TABLES["experiments"]
VECTORS = TABLES["concept_vectors"]
STAGE_RUNS = TABLES["stage_runs"]
ROLLOUTS = TABLES["rollouts"]
JUDGE_CONFIGS = TABLES["judge_configs"]
JUDGMENTS = TABLES["judgments"]
JUDGE_CACHE = TABLES["judge_cache"]
READOUTS = TABLES["readouts"]

ROLLOUT_KEY = ["experiment_id", "patch_layer", "source_word", "target_word", "sample_index"]
JUDGMENT_KEY = ["rollout_id", "grader", "judge_config_id"]
JUDGE_CONFIG_KEY = ["model", "reasoning", "template_version", "backend", "verdict_mode"]
VECTOR_KEY = ["model", "layer", "word", "recipe"]
STAGE_RUN_KEY = ["stage", "host", "pid", "started_at"]
READOUT_KEY = ["experiment_id", "patch_layer", "source_word", "target_word", "question"]
REPORTED = ["sweeps", "experiments", "stage_runs", "concept_vectors", "judge_configs",
            "rollouts", "readouts", "judgments", "judge_cache", "labels"]


@dataclass
class MergeResult:
    """What one source added: rows inserted per table, and judgments left out."""

    source: str
    copied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REPORTED, 0))
    skipped_judgments: int = 0

    @property
    def total(self) -> int:
        return sum(self.copied.values())


# A table a feature above the store keeps beside the rollouts (labels): copied after the
# judgments, given (target, source, experiment ids source -> target, the rollouts here by key,
# chunk size, the result to count into, progress).
MergeStep = Callable[[Store, Store, dict[int, int], dict[tuple[int, int, str, str, int],
                                                         tuple[int, int]],
                      int, MergeResult, Callable[[str, int], None] | None], None]


def merge_stores(
    target: Store, sources: Sequence[Store], chunk_rows: int = CHUNK_ROWS,
    progress: Callable[[str, int], None] | None = None, steps: Sequence[MergeStep] = (),
) -> list[MergeResult]:
    """Merge every source into target, in order. All sweeps are checked before any row is
    written. `progress(table, n)` is told of each chunk copied. `steps` copy the tables of
    features above the store (the CLI passes the labels' step), each after the judgments."""
    for source in sources:
        if source.url == target.url:
            raise StoreError(f"cannot merge {target.where} into itself")
    check_sweeps_agree(target, sources)
    return [_merge_one(target, source, chunk_rows, progress, steps) for source in sources]


@dataclass(frozen=True)
class _SweepIdentity:
    where: str
    config: SweepConfig
    prompt_text: str | None
    injection_start: int | None
    top_k: int | None
    top_p: float | None


def _sweep_identities(store: Store) -> dict[str, _SweepIdentity]:
    with store.read() as s:
        rows = s.execute(select(SWEEPS.c.name, SWEEPS.c.config_json, SWEEPS.c.prompt_text,
                                SWEEPS.c.injection_start, SWEEPS.c.top_k, SWEEPS.c.top_p)).all()
    return {name: _SweepIdentity(store.where, config_from_json(cfg), prompt, start, k, p)
            for name, cfg, prompt, start, k, p in rows}


def _disagreement(a: _SweepIdentity, b: _SweepIdentity) -> tuple[str, str] | None:
    """What differs (and, for settings, both values) between two stores' copies of a sweep.
    Only its science counts: [judge] settings are how it is graded, not what it is."""
    differ = science_differences(a.config, b.config, f"in {a.where}", f"in {b.where}")
    if differ is not None:
        return "config", f" ({differ})"
    for what, x, y in (("rendered prompt", a.prompt_text, b.prompt_text),
                       ("injection start", a.injection_start, b.injection_start),
                       ("top_k", a.top_k, b.top_k), ("top_p", a.top_p, b.top_p)):
        if x is not None and y is not None and x != y:
            shown = "" if what == "rendered prompt" else f" ({x} in {a.where}, {y} in {b.where})"
            return what, shown
    return None


def check_sweeps_agree(target: Store, sources: Iterable[Store]) -> None:
    """Refuse (ConfigError) when a sweep name means different sweeps in two of the stores."""
    seen = _sweep_identities(target)
    for source in sources:
        for name, ident in _sweep_identities(source).items():
            other = seen.get(name)
            found = _disagreement(other, ident) if other is not None else None
            if other is not None and found is not None:
                what, values = found
                raise ConfigError(
                    f"cannot merge {source.where}: its sweep {name!r} has a different {what} "
                    f"than in {other.where}; nothing was merged{values}"
                )
            if other is None or other.prompt_text is None:
                seen[name] = ident


def utc(value: Any) -> Any:
    """Time stamps leave as aware UTC, whatever the source backend handed out."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


_COPIED_COLUMNS = {t.name: [c.name for c in t.columns if c.name != "id"] for t in TABLES.values()}
_TIME_COLUMNS = {t.name: [c.name for c in t.columns if isinstance(c.type, DateTime)]
                 for t in TABLES.values()}


def _values(row: RowMapping, table: Table, **changes: Any) -> dict[str, Any]:
    """A source row as insert values for target: no id, foreign keys replaced by `changes`."""
    values = {name: row[name] for name in _COPIED_COLUMNS[table.name]}
    for name in _TIME_COLUMNS[table.name]:
        values[name] = utc(values[name])
    values.update(changes)
    return values


def insert_new(conn: Connection, table: Table, key: list[str], rows: list[dict[str, Any]],
               returning: Sequence[str] = ("id",)) -> list[tuple[Any, ...]]:
    """INSERT ... ON CONFLICT (key) DO NOTHING for many rows; returns the new rows' `returning`
    columns."""
    if not rows:
        return []
    if conn.dialect.name == "sqlite":
        stmt: Any = sqlite_insert(table)
    elif conn.dialect.name == "postgresql":
        stmt = pg_insert(table)
    else:
        raise StoreError(f"merge supports SQLite and PostgreSQL stores, not {conn.dialect.name}")
    stmt = stmt.on_conflict_do_nothing(index_elements=key).returning(
        *(table.c[name] for name in returning))
    if conn.dialect.name == "postgresql":
        return _psycopg_executemany(conn, stmt, rows)
    return [tuple(row) for row in conn.execute(stmt, rows)]


def _psycopg_executemany(conn: Connection, stmt: Any, rows: list[dict[str, Any]]
                         ) -> list[tuple[Any, ...]]:
    """psycopg's own executemany: pipelined, the statement parsed once. It is about four times
    faster than SQLAlchemy's multi-VALUES batches, which psycopg re-parses batch by batch."""
    sql = str(stmt.compile(dialect=conn.dialect, column_keys=list(rows[0])))
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    out: list[tuple[Any, ...]] = []
    try:
        cursor.executemany(sql, rows, returning=True)
        while True:
            out.extend(tuple(row) for row in cursor.fetchall())
            if not cursor.nextset():
                break
    except dbapi.Error as exc:
        raise DBAPIError.instance(sql, None, exc, dbapi.Error) from None
    finally:
        cursor.close()
    return out


def _inserter(table: Table, key: list[str], rows: list[dict[str, Any]]) -> Callable[[Session], int]:
    """insert_new as a unit for Store.transact, counting the new rows."""
    return lambda session: len(insert_new(session.connection(), table, key, rows))


def chunks(store: Store, query: Any, id_column: Any, size: int) -> Iterable[Sequence[RowMapping]]:
    """The query's rows in id order, `size` at a time (keyset paging, one short read each)."""
    last = 0
    while True:
        with store.read() as s:
            rows = s.execute(query.where(id_column > last).order_by(id_column).limit(size)
                             ).mappings().all()
        if not rows:
            return
        last = rows[-1]["id"]
        yield rows


def _copy_plain(target: Store, source: Store, table: Table, key: list[str], size: int,
                result: MergeResult, progress: Callable[[str, int], None] | None) -> None:
    """A table without foreign keys, chunk by chunk."""
    for rows in chunks(source, select(table), table.c.id, size):
        values = [_values(r, table) for r in rows]
        n = target.transact(_inserter(table, key, values))
        result.copied[table.name] += n
        if progress:
            progress(table.name, n)


def _merge_one(target: Store, source: Store, size: int,
               progress: Callable[[str, int], None] | None,
               steps: Sequence[MergeStep]) -> MergeResult:
    result = MergeResult(source.where)
    sweep_ids, experiment_ids = target.transact(lambda s: _merge_sweeps(s, source, result))
    run_ids = target.transact(lambda s: _merge_stage_runs(s, source, sweep_ids, result))
    _copy_plain(target, source, VECTORS, VECTOR_KEY, VECTOR_CHUNK_ROWS, result, progress)
    _copy_plain(target, source, JUDGE_CACHE, ["request_hash"], size, result, progress)
    config_ids = target.transact(lambda s: _merge_judge_configs(s, source, result))
    here = _rollouts_here(target, set(experiment_ids.values()))
    _copy_rollouts(target, source, experiment_ids, run_ids, here, size, result, progress)
    _copy_readouts(target, source, experiment_ids, run_ids, size, result, progress)
    _copy_judgments(target, source, experiment_ids, here, config_ids, run_ids, size, result,
                    progress)
    for step in steps:
        step(target, source, experiment_ids, here, size, result, progress)
    return result


def _merge_sweeps(s: Session, source: Store, result: MergeResult
                  ) -> tuple[dict[int, int], dict[int, int]]:
    """Sweeps and experiments (one transaction); returns source id -> target id for both."""
    conn = s.connection()
    with source.read() as src:
        sweeps = src.execute(select(SWEEPS)).mappings().all()
        experiments = src.execute(select(EXPERIMENTS)).mappings().all()
    here = {r["name"]: r for r in conn.execute(select(SWEEPS)).mappings()}
    for sweep in sweeps:
        mine = here.get(sweep["name"])
        if mine is not None and science_differences(
                config_from_json(mine["config_json"]), config_from_json(sweep["config_json"]),
                "here", "there") is not None:
            raise ConfigError(f"cannot merge {source.where}: its sweep {sweep['name']!r} has a "
                              "different config than here; nothing was merged")
        if mine is None:
            result.copied["sweeps"] += len(insert_new(conn, SWEEPS, ["name"],
                                                      [_values(sweep, SWEEPS)]))
        elif mine["prompt_text"] is None and sweep["prompt_text"] is not None:
            conn.execute(update(SWEEPS).where(SWEEPS.c.id == mine["id"]).values(
                prompt_text=sweep["prompt_text"], injection_start=sweep["injection_start"]))
        if mine is not None and mine["top_k"] is None and sweep["top_k"] is not None:
            conn.execute(update(SWEEPS).where(SWEEPS.c.id == mine["id"]).values(
                top_k=sweep["top_k"], top_p=sweep["top_p"]))
    names = {r["name"]: r["id"] for r in conn.execute(select(SWEEPS.c.name, SWEEPS.c.id)).mappings()}
    sweep_ids = {r["id"]: names[r["name"]] for r in sweeps}
    rows = [_values(e, EXPERIMENTS, sweep_id=sweep_ids[e["sweep_id"]]) for e in experiments]
    result.copied["experiments"] += len(insert_new(conn, EXPERIMENTS, ["sweep_id", "name"], rows))
    exp_ids = {(r["sweep_id"], r["name"]): r["id"]
               for r in conn.execute(select(EXPERIMENTS)).mappings()}
    experiment_ids = {e["id"]: exp_ids[(sweep_ids[e["sweep_id"]], e["name"])] for e in experiments}
    return sweep_ids, experiment_ids


def _merge_stage_runs(s: Session, source: Store, sweep_ids: dict[int, int],
                      result: MergeResult) -> dict[int, int]:
    """Stage runs as history; returns source id -> target id."""
    conn = s.connection()
    with source.read() as src:
        runs = src.execute(select(STAGE_RUNS).order_by(STAGE_RUNS.c.id)).mappings().all()

    def key(row: RowMapping | dict[str, Any]) -> tuple[Any, ...]:
        return tuple(utc(row[k]) for k in STAGE_RUN_KEY)

    here = {key(r): r for r in conn.execute(select(STAGE_RUNS)).mappings()}
    run_ids: dict[int, int] = {}
    for run in runs:
        mine = here.get(key(run))
        if mine is None:
            values = _values(run, STAGE_RUNS, sweep_id=sweep_ids.get(run["sweep_id"]))
            run_ids[run["id"]] = conn.execute(
                STAGE_RUNS.insert().values(values).returning(STAGE_RUNS.c.id)).scalar_one()
            result.copied["stage_runs"] += 1
            continue
        run_ids[run["id"]] = mine["id"]
        if utc(run["heartbeat_at"]) > utc(mine["heartbeat_at"]):
            conn.execute(update(STAGE_RUNS).where(STAGE_RUNS.c.id == mine["id"]).values(
                status=run["status"], heartbeat_at=utc(run["heartbeat_at"]),
                finished_at=utc(run["finished_at"]), error=run["error"]))
    return run_ids


def _merge_judge_configs(s: Session, source: Store, result: MergeResult) -> dict[int, int]:
    conn = s.connection()
    with source.read() as src:
        configs = src.execute(select(JUDGE_CONFIGS)).mappings().all()
    rows = [_values(c, JUDGE_CONFIGS) for c in configs]
    result.copied["judge_configs"] += len(insert_new(conn, JUDGE_CONFIGS, JUDGE_CONFIG_KEY, rows))
    here = {tuple(r[k] for k in JUDGE_CONFIG_KEY): r["id"]
            for r in conn.execute(select(JUDGE_CONFIGS)).mappings()}
    return {c["id"]: here[tuple(c[k] for k in JUDGE_CONFIG_KEY)] for c in configs}


RolloutKey = tuple[int, int, str, str, int]  # target experiment id, layer, source, target, sample
RolloutsHere = dict[RolloutKey, tuple[int, int]]  # key -> (target id, hash of the answer)


def _rollouts_here(target: Store, experiments: set[int]) -> RolloutsHere:
    """The target's rollouts of the merged experiments, streamed."""
    r = ROLLOUTS.c
    query = select(r.id, r.experiment_id, r.patch_layer, r.source_word, r.target_word,
                   r.sample_index, r.answer).execution_options(yield_per=10_000)
    here: RolloutsHere = {}
    with target.read() as s:
        for rid, exp, layer, src, tgt, sample, answer in s.execute(query):
            if exp in experiments:
                here[(exp, layer, src, tgt, sample)] = (rid, hash(answer))
    return here


def with_rollout_key(table: Table) -> Any:
    """SELECT the rows of a table that points at rollouts (judgments, labels), each with its
    rollout's key and answer, so it can be matched to the same rollout in another store."""
    r = ROLLOUTS.c
    return (select(table, r.experiment_id.label("r_experiment"),
                   r.patch_layer.label("r_layer"), r.source_word.label("r_source"),
                   r.target_word.label("r_target"), r.sample_index.label("r_sample"),
                   r.answer.label("r_answer"))
            .join(ROLLOUTS, r.id == table.c.rollout_id))


def rollout_here(row: RowMapping, experiment_ids: dict[int, int],
                 here: RolloutsHere) -> tuple[int, int] | None:
    """(target rollout id, hash of its answer) of a with_rollout_key row, or None."""
    exp = experiment_ids.get(row["r_experiment"])
    if exp is None:
        return None
    return here.get((exp, row["r_layer"], row["r_source"], row["r_target"], row["r_sample"]))


def _copy_rollouts(target: Store, source: Store, experiment_ids: dict[int, int],
                   run_ids: dict[int, int], here: RolloutsHere, size: int, result: MergeResult,
                   progress: Callable[[str, int], None] | None) -> None:
    """Every source rollout whose key is not here, in id order (a primary-key range scan per
    chunk); `here` learns the new rows."""
    for rows in chunks(source, select(ROLLOUTS), ROLLOUTS.c.id, size):
        values, answers = [], {}
        for r in rows:
            exp = experiment_ids.get(r["experiment_id"])
            if exp is None:
                continue  # an experiment newer than our copy of them; next merge
            key = (exp, r["patch_layer"], r["source_word"], r["target_word"], r["sample_index"])
            if key in here:
                continue
            values.append(_values(r, ROLLOUTS, experiment_id=exp,
                                  stage_run_id=run_ids.get(r["stage_run_id"])))
            answers[key] = hash(r["answer"])
        if not values:
            continue

        def insert(session: Session, values: list[dict[str, Any]] = values) -> list[tuple[Any, ...]]:
            return insert_new(session.connection(), ROLLOUTS, ROLLOUT_KEY, values,
                              returning=["id", *ROLLOUT_KEY])

        new = target.transact(insert)
        for rid, *new_key in new:
            here[tuple(new_key)] = (rid, answers[tuple(new_key)])
        result.copied["rollouts"] += len(new)
        if progress:
            progress("rollouts", len(new))


def _copy_readouts(target: Store, source: Store, experiment_ids: dict[int, int],
                   run_ids: dict[int, int], size: int, result: MergeResult,
                   progress: Callable[[str, int], None] | None) -> None:
    """Every source first-token readout whose key is not here (a readout is deterministic, so
    a key already here keeps its row)."""
    for rows in chunks(source, select(READOUTS), READOUTS.c.id, size):
        values = [_values(r, READOUTS, experiment_id=experiment_ids[r["experiment_id"]],
                          stage_run_id=run_ids.get(r["stage_run_id"]))
                  for r in rows if r["experiment_id"] in experiment_ids]
        if not values:
            continue
        n = target.transact(_inserter(READOUTS, READOUT_KEY, values))
        result.copied["readouts"] += n
        if progress:
            progress("readouts", n)


def _copy_judgments(target: Store, source: Store, experiment_ids: dict[int, int],
                    here: RolloutsHere, config_ids: dict[int, int],
                    run_ids: dict[int, int], size: int, result: MergeResult,
                    progress: Callable[[str, int], None] | None) -> None:
    """Every source judgment, attached to the target rollout of the same key and answer."""
    for rows in chunks(source, with_rollout_key(JUDGMENTS), JUDGMENTS.c.id, size):
        values = []
        for j in rows:
            mine = rollout_here(j, experiment_ids, here)
            config_id = config_ids.get(j["judge_config_id"])
            if mine is None or config_id is None:
                continue  # its rollout or judge config is newer than our copy; next merge
            if mine[1] != hash(j["r_answer"]):
                result.skipped_judgments += 1
                continue
            values.append(_values(j, JUDGMENTS, rollout_id=mine[0], judge_config_id=config_id,
                                  stage_run_id=run_ids.get(j["stage_run_id"])))
        if not values:
            continue
        n = target.transact(_judgment_inserter(values))
        result.copied["judgments"] += n
        if progress:
            progress("judgments", n)


def _judgment_inserter(values: list[dict[str, Any]]) -> Callable[[Session], int]:
    return lambda session: _insert_missing_judgments(session.connection(), values)


def _insert_missing_judgments(conn: Connection, values: list[dict[str, Any]]) -> int:
    """Insert the judgments whose key is not here yet (looked up first: a re-merge then
    writes nothing); returns how many were new."""
    rollout_ids = sorted({v["rollout_id"] for v in values})
    j = JUDGMENTS.c
    present = {tuple(row) for row in conn.execute(
        select(j.rollout_id, j.grader, j.judge_config_id).where(j.rollout_id.in_(rollout_ids)))}
    missing = [v for v in values if (v["rollout_id"], v["grader"], v["judge_config_id"]) not in present]
    return len(insert_new(conn, JUDGMENTS, JUDGMENT_KEY, missing))
