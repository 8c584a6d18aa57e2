"""`patchdb merge`: rollouts from a GPU box meet judgments from a laptop, on SQLite and PostgreSQL.

Stores are filled the way the stages fill them (a stage run, rollouts, a judge config,
judgments), then compared by natural keys, never by ids: ids differ between stores on purpose.
"""

import shutil
import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import file_digest, run_cli
from sqlalchemy import select, text
from test_cli_store import MINI

from patchdb.config import config_from_dict
from patchdb.experiments import EXPERIMENTS, NO_STEERING, experiment_keys
from patchdb.store import (
    ConceptVector,
    Experiment,
    JudgeCacheEntry,
    JudgeConfig,
    Judgment,
    Rollout,
    Store,
    open_store,
)
from patchdb.store.merge import merge_stores
from patchdb.store.runs import stage_run
from patchdb.store.sweeps import register_sweep

CONFIG = config_from_dict(tomllib.loads(MINI))  # sweep "mini": 2 experiments, layers 20-21


def _new_store(db: str, config_text: str = MINI) -> Store:
    store = open_store(db, create=True)
    store.transact(lambda s: register_sweep(s, config_from_dict(tomllib.loads(config_text))))
    return store


def _generate(store: Store, experiment: str, layer: int, answer: str = "I notice {t}.") -> None:
    """Rollouts for every key and sample of one experiment at one layer, under a stage run."""
    with store.read() as s:
        exp = s.scalar(select(Experiment).where(Experiment.name == experiment))
    assert exp is not None
    keys = experiment_keys(EXPERIMENTS[experiment], CONFIG.positive_words, CONFIG.negative_words)
    with stage_run(store, "generate", {"layer": layer}, exp.sweep_id) as run:
        store.transact(lambda s: s.add_all(
            Rollout(experiment_id=exp.id, patch_layer=layer, source_word=src, target_word=tgt,
                    sample_index=i, answer=answer.format(t=tgt or "nothing"), n_tokens=4,
                    finish_reason="stop", seed=1000 * layer + i, stage_run_id=run.id)
            for src, tgt in keys for i in range(CONFIG.samples)))


def _judge(store: Store, layer: int) -> None:
    """Judge every rollout at a layer with both of its graders; some verdicts unparsed."""
    with stage_run(store, "judge", {"layer": layer}) as run:
        def judge(s: Any) -> None:
            config = s.scalar(select(JudgeConfig).where(JudgeConfig.model == "laptop-judge"))
            if config is None:
                config = JudgeConfig(model="laptop-judge", reasoning="medium",
                                     template_version="v1", backend="openai")
                s.add(config)
                s.flush()
            rows = s.execute(select(Rollout, Experiment.detection_grader)
                             .join(Experiment, Experiment.id == Rollout.experiment_id)
                             .where(Rollout.patch_layer == layer)).all()
            for rollout, grader in rows:
                for g, verdict in (("coherence", True),
                                   (grader, [True, False, None][rollout.sample_index % 3])):
                    s.add(Judgment(rollout_id=rollout.id, grader=g, judge_config_id=config.id,
                                   verdict=verdict, raw_reply="... YES", attempts=1, cost=0.001,
                                   stage_run_id=run.id))
            s.add(JudgeCacheEntry(request_hash=f"hash-{layer}", reply_json="{}"))
        store.transact(judge)


def _add_vector(store: Store, word: str) -> None:
    store.transact(lambda s: s.add(ConceptVector(model="smollm2-135m", layer=18, word=word,
                                                 recipe="mean-diff-100", dimension=2, norm=1.0,
                                                 vector=b"\x00\x01" * 4)))


def _utc(value: Any) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


SNAPSHOT = {
    "sweeps": "SELECT name, config_json, prompt_text, injection_start FROM sweeps",
    "experiments": "SELECT s.name, e.name, e.detection_grader FROM experiments e "
                   "JOIN sweeps s ON s.id = e.sweep_id",
    "concept_vectors": "SELECT model, layer, word, recipe, norm, vector FROM concept_vectors",
    "judge_configs": "SELECT model, reasoning, template_version, backend FROM judge_configs",
    "judge_cache": "SELECT request_hash, reply_json FROM judge_cache",
    "rollouts": "SELECT s.name, e.name, r.patch_layer, r.source_word, r.target_word, "
                "r.sample_index, r.answer, r.seed, g.host, g.pid, g.stage, r.created_at "
                "FROM rollouts r JOIN experiments e ON e.id = r.experiment_id "
                "JOIN sweeps s ON s.id = e.sweep_id LEFT JOIN stage_runs g ON g.id = r.stage_run_id",
    "judgments": "SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index, "
                 "j.grader, c.model, j.verdict, j.raw_reply, j.cost, g.stage "
                 "FROM judgments j JOIN rollouts r ON r.id = j.rollout_id "
                 "JOIN experiments e ON e.id = r.experiment_id "
                 "JOIN judge_configs c ON c.id = j.judge_config_id "
                 "LEFT JOIN stage_runs g ON g.id = j.stage_run_id",
    "stage_runs": "SELECT stage, host, pid, status, started_at, s.name FROM stage_runs "
                  "LEFT JOIN sweeps s ON s.id = stage_runs.sweep_id",
    "layer_rates": "SELECT experiment, patch_layer, source, target, n, n_scored, rate "
                   "FROM layer_rates",
}


def snapshot(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table as sorted rows without ids, time stamps as UTC text, rates as floats."""
    store = open_store(db)
    out: dict[str, list[tuple[Any, ...]]] = {}
    with store.read() as s:
        for table, sql in SNAPSHOT.items():
            rows = []
            for row in s.execute(text(sql)):
                rows.append(tuple(
                    _utc(v) if isinstance(v, datetime) or (isinstance(v, str) and v[:2] == "20"
                                                            and v[10:11] in (" ", "T"))
                    else float(v) if isinstance(v, Decimal)  # AVG on PostgreSQL
                    else bytes(v) if isinstance(v, memoryview) else v for v in row))
            out[table] = sorted(rows, key=repr)
    store.close()
    return out


def dump_with_ids(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table, ids included: what "merging again changes nothing" compares."""
    store = open_store(db)
    with store.read() as s:
        out = {t: sorted(map(tuple, s.execute(text(f"SELECT * FROM {t}"))), key=repr)
               for t in ("sweeps", "experiments", "stage_runs", "concept_vectors", "rollouts",
                         "judge_configs", "judgments", "judge_cache")}
    store.close()
    return out


def copied(output: str) -> dict[str, int]:
    """The per-table counts `patchdb merge` printed (for its one source)."""
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def _merge(other: str, into: str) -> dict[str, int]:
    result = run_cli("merge", other, "--db", into)
    assert result.exit_code == 0, result.output
    return copied(result.output)


def _gpu_box(db: str) -> None:
    store = _new_store(db)
    _add_vector(store, "Bread")
    _generate(store, "steered_to_unsteered", 20)
    _generate(store, "success_to_failure", 20)
    store.close()


def _diverge(gpu: str, laptop: str) -> None:
    """The GPU box generates more; the laptop judges what it has and generates a little too.
    Both give new rows the same ids, for different rollouts."""
    store = open_store(gpu)
    _generate(store, "steered_to_unsteered", 21)
    _add_vector(store, "Trees")
    store.close()
    store = open_store(laptop)
    _generate(store, "success_to_failure", 21, answer="Laptop says {t}.")
    _judge(store, 20)
    _judge(store, 21)
    store.close()


def _copy_sqlite(src: str, dst: str) -> None:
    for suffix in ("", "-wal"):
        if Path(src + suffix).exists():
            shutil.copy(src + suffix, dst + suffix)


KEYS_PER_LAYER = {"steered_to_unsteered": 2, "success_to_failure": 2}


def _assert_gpu_and_laptop_merged(gpu: str, laptop: str) -> None:
    into_gpu = _merge(laptop, gpu)
    assert into_gpu["sweeps"] == 0 and into_gpu["experiments"] == 0
    assert into_gpu["rollouts"] == 2 * 2  # success_to_failure at layer 21: 2 keys x 2 samples
    assert into_gpu["judgments"] == (4 + 4 + 4) * 2  # every laptop rollout, two graders
    assert into_gpu["judge_configs"] == 1 and into_gpu["judge_cache"] == 2
    assert into_gpu["stage_runs"] == 3  # the laptop's generate and two judge runs
    into_laptop = _merge(gpu, laptop)
    assert into_laptop["rollouts"] == 4 and into_laptop["judgments"] == 0
    assert into_laptop["concept_vectors"] == 1 and into_laptop["stage_runs"] == 1
    merged = snapshot(gpu)
    assert merged == snapshot(laptop)
    assert len(merged["rollouts"]) == 4 * 2 * 2  # two experiments x two keys x two layers x 2
    assert len(merged["stage_runs"]) == 2 + 1 + 3
    status = run_cli("status", "--db", gpu, "--json")
    assert '"rollouts_present": 16' in status.output and '"judged": ' in status.output
    before = {db: dump_with_ids(db) for db in (gpu, laptop)}
    assert set(_merge(laptop, gpu).values()) == {0}
    assert set(_merge(gpu, laptop).values()) == {0}
    assert {db: dump_with_ids(db) for db in (gpu, laptop)} == before


def test_gpu_rollouts_meet_laptop_judgments(tmp_path: Path) -> None:
    """The laptop's store is a file copy of the GPU box's; both go on, then merge both ways."""
    gpu, laptop = str(tmp_path / "gpu.sqlite"), str(tmp_path / "laptop.sqlite")
    _gpu_box(gpu)
    _copy_sqlite(gpu, laptop)
    _diverge(gpu, laptop)
    _assert_gpu_and_laptop_merged(gpu, laptop)


@pytest.mark.parametrize("gpu_backend", ["sqlite", "postgresql"])
def test_sqlite_and_postgresql_merge_both_ways(
    gpu_backend: str, pg_url: str, tmp_path: Path
) -> None:
    """One store on each backend: the laptop's copy is made by merging into an empty store."""
    sqlite_db = str(tmp_path / "laptop.sqlite")
    gpu, laptop = (sqlite_db, pg_url) if gpu_backend == "sqlite" else (pg_url, sqlite_db)
    _gpu_box(gpu)
    first = _merge(gpu, laptop)
    assert first["sweeps"] == 1 and first["rollouts"] == 8 and first["stage_runs"] == 2
    assert snapshot(gpu) == snapshot(laptop)
    _diverge(gpu, laptop)
    _assert_gpu_and_laptop_merged(gpu, laptop)
    rates = snapshot(laptop)["layer_rates"]
    bread = [r for r in rates if r[:4] == ("steered_to_unsteered", 20, "Bread", "(none)")]
    assert bread == [("steered_to_unsteered", 20, "Bread", "(none)", 2, 2, 0.5)]


def test_kill_mid_merge_leaves_a_rerunnable_state(tmp_path: Path) -> None:
    gpu, laptop = str(tmp_path / "gpu.sqlite"), str(tmp_path / "laptop.sqlite")
    _gpu_box(gpu)
    store = open_store(gpu)
    _judge(store, 20)
    store.close()

    def stop_after_first_rollouts(table: str, n: int) -> None:
        if table == "rollouts":
            raise KeyboardInterrupt

    target, source = open_store(laptop, create=True), open_store(gpu)
    with pytest.raises(KeyboardInterrupt):
        merge_stores(target, [source], chunk_rows=3, progress=stop_after_first_rollouts)
    partial = snapshot(laptop)
    assert len(partial["rollouts"]) == 3 and partial["judgments"] == []
    target.close()
    source.close()
    again = _merge(gpu, laptop)
    assert again["rollouts"] == 8 - 3 and again["judgments"] == 16 and again["sweeps"] == 0
    assert snapshot(gpu) == snapshot(laptop)


def test_judgments_of_another_answer_are_not_copied(tmp_path: Path) -> None:
    """Both stores generated the same samples: the laptop's judgments grade its own answers."""
    gpu, laptop = str(tmp_path / "gpu.sqlite"), str(tmp_path / "laptop.sqlite")
    _gpu_box(gpu)
    store = _new_store(laptop)
    _generate(store, "steered_to_unsteered", 20, answer="Something else about {t}.")
    _judge(store, 20)
    store.close()
    result = run_cli("merge", laptop, "--db", gpu)
    assert result.exit_code == 0, result.output
    assert copied(result.output)["rollouts"] == 0 and copied(result.output)["judgments"] == 0
    assert "8 judgments not copied: their rollout has a different answer here" in result.output
    with open_store(gpu).read() as s:
        assert s.scalar(text("SELECT count(*) FROM judgments")) == 0
        assert s.scalar(text("SELECT min(answer) FROM rollouts WHERE source_word = 'Bread' "
                             "AND target_word = :none"), {"none": NO_STEERING}) == "I notice nothing."


def _assert_one_line_error(result, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output


@pytest.mark.parametrize(
    ("change", "what"),
    [(("samples = 2", "samples = 3"), "config"), (("Bread", "Bread"), "rendered prompt")],
)
def test_a_sweep_with_another_config_is_refused(
    tmp_path: Path, change: tuple[str, str], what: str
) -> None:
    """Nothing is written, not even from a good store named before the bad one."""
    here, good, bad = (str(tmp_path / f"{n}.sqlite") for n in ("here", "good", "bad"))
    _gpu_box(here)
    store = _new_store(good, MINI.replace('name = "mini"', 'name = "other"'))
    _generate(store, "steered_to_unsteered", 20)
    store.close()
    store = _new_store(bad, MINI.replace(*change))
    if what == "rendered prompt":
        store.transact(lambda s: s.execute(text("UPDATE sweeps SET prompt_text = 'p2'")))
        mine = open_store(here)
        mine.transact(lambda s: s.execute(text("UPDATE sweeps SET prompt_text = 'p1'")))
        mine.close()
    store.close()
    before = file_digest(Path(here))
    result = run_cli("merge", good, bad, "--db", here)
    _assert_one_line_error(
        result, f"cannot merge {bad}: its sweep 'mini' has a different {what} than in {here}; "
        "nothing was merged")
    assert file_digest(Path(here)) == before


def test_merging_a_store_into_itself_or_a_missing_one(tmp_path: Path) -> None:
    db = str(tmp_path / "here.sqlite")
    _gpu_box(db)
    _assert_one_line_error(run_cli("merge", db, "--db", db), "into itself")
    missing = tmp_path / "missing.sqlite"
    fresh = tmp_path / "fresh.sqlite"
    _assert_one_line_error(run_cli("merge", missing, "--db", fresh), f"no store at {missing}")
    assert not fresh.exists() and not missing.exists()


def test_merge_has_an_example() -> None:
    assert "Example:" in run_cli("merge", "--help").output
    assert run_cli("merge").exit_code == 1


def test_a_stage_run_merged_while_running_learns_how_it_ended(tmp_path: Path) -> None:
    gpu, laptop = str(tmp_path / "gpu.sqlite"), str(tmp_path / "laptop.sqlite")
    _gpu_box(gpu)
    store = open_store(gpu)
    store.transact(lambda s: s.execute(text(
        "UPDATE stage_runs SET status = 'running', finished_at = NULL WHERE stage = 'generate'")))
    _merge(gpu, laptop)
    store.transact(lambda s: s.execute(text(
        "UPDATE stage_runs SET status = 'finished', heartbeat_at = '2099-01-01 00:00:00.000000' "
        "WHERE stage = 'generate'")))
    store.close()
    assert set(_merge(gpu, laptop).values()) == {0}
    statuses = [row[3] for row in snapshot(laptop)["stage_runs"]]
    assert statuses == ["finished", "finished"]
