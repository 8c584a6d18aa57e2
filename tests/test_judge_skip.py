"""A judge run with nothing pending counts that first and returns: no backend is built, so no
model is loaded and no API key is needed, and (as for a generate run with nothing to generate)
no stage_runs row is added: a run that did nothing does not grow the history."""

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from judge_server import make_store
from tiny_models import save_tiny_llama

from patchdb.config import config_from_dict
from patchdb.errors import ModelError
from patchdb.store import open_store
from patchdb.store.runs import stage_run
from patchdb.sweep import SweepOptions, run_sweep

N_ROLLOUTS = 4  # make_store with one layer, one sample, the two single-word experiments
SMALL = {"patch_layers": "2", "samples": 1,
         "experiments": ["steered_to_unsteered", "unsteered_to_steered"]}


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def refuse_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, loading any model fails the way a broken model spec does."""

    def refuse(spec: str, *args: Any, **kwargs: Any) -> Any:
        raise ModelError(f"refusing to load {spec}")

    monkeypatch.setattr("patchdb.generate.loading.load_model", refuse)


def refuse_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a judge backend was built")

    monkeypatch.setattr("patchdb.judge.stage.make_backend", refuse)


def test_hf_rerun_loads_no_model(db_path: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = save_tiny_llama(tmp_path / "m")
    assert make_store(db_path, **SMALL) == N_ROLLOUTS
    # a relative path: judge_configs holds the resolved path, and the skip must find it by that
    hf = ["--judge-backend", "hf", "--judge-model", "./m", "--judge-max-new-tokens", "8"]
    first = run_cli("judge", "--db", db_path, *hf)
    assert first.exit_code == 0, first.output
    assert f"Judged {2 * N_ROLLOUTS} calls" in first.output
    assert rows(db_path, "SELECT model FROM judge_configs") == [(str(model.resolve()),)]
    stored = rows(db_path, "SELECT * FROM judgments ORDER BY id")

    refuse_model_loading(monkeypatch)
    nothing = (f"Judged 0 calls: nothing to judge (all {2 * N_ROLLOUTS} calls of sweep 'small' "
               "in scope have a judgment).")
    for spec in ("./m", str(model)):  # the same model by either name
        again = run_cli("judge", "--db", db_path, "--judge-backend", "hf", "--judge-model", spec)
        assert again.exit_code == 0, again.output
        assert again.output.strip() == nothing
    errors = run_cli("judge", "--db", db_path, *hf, "--retry-errors", "--limit", "1")
    assert errors.exit_code == 0, errors.output
    assert errors.output.strip() == ("Judged 0 calls: nothing to judge (no judgment with an "
                                     "error of sweep 'small' in scope).")
    dry = run_cli("judge", "--db", db_path, *hf, "--dry-run")
    assert dry.exit_code == 0, dry.output
    total = next(line for line in dry.output.splitlines() if line.startswith("total"))
    # calls, judged, send now, awaiting: make_store writes no baselines, so theirs (the control
    # and Bread's and Trees' in unsteered_to_steered, 1 sample, 2 graders) wait for generate
    assert total.split()[-4:] == ["14", "8", "0", "6"]

    # where there is work, the model is loaded: the refusal above is real
    overwrite = run_cli("judge", "--db", db_path, *hf, "--overwrite")
    assert overwrite.exit_code == 1
    assert overwrite.output.strip() == "Error: refusing to load ./m"
    assert rows(db_path, "SELECT * FROM judgments ORDER BY id") == stored

    # --retry-unparsed from two known states: no unparsed row needs no model; one row does
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE judgments SET verdict = 0 WHERE verdict IS NULL AND error IS NULL")
    none = run_cli("judge", "--db", db_path, *hf, "--retry-unparsed")
    assert none.exit_code == 0, none.output
    assert none.output.strip() == ("Judged 0 calls: nothing to judge (no unparsed judgment of "
                                   "sweep 'small' in scope).")
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE judgments SET verdict = NULL, error = NULL "
                     "WHERE id = (SELECT min(id) FROM judgments)")
    stored = rows(db_path, "SELECT * FROM judgments ORDER BY id")
    plan = run_cli("judge", "--db", db_path, *hf, "--retry-unparsed", "--dry-run")
    total = next(line for line in plan.output.splitlines() if line.startswith("total"))
    assert total.split()[-4:] == ["14", "8", "1", "6"]  # the dry run counts the one row too
    one = run_cli("judge", "--db", db_path, *hf, "--retry-unparsed")
    assert one.exit_code == 1, one.output
    assert one.output.strip() == "Error: refusing to load ./m"

    assert rows(db_path, "SELECT * FROM judgments ORDER BY id") == stored
    assert len(rows(db_path, "SELECT id FROM judge_configs")) == 1
    # only the run that judged something is recorded: refused loads and no-op runs are not
    runs = rows(db_path, "SELECT stage, status FROM stage_runs ORDER BY id")
    assert runs == [("judge", "finished")]


def test_nothing_pending_needs_no_backend(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No rollouts at all: every mode has nothing to do, and no API key is asked for."""
    make_store(db_path, last=0, **SMALL)
    refuse_backends(monkeypatch)
    for mode in ("--only-missing", "--retry-unparsed", "--retry-errors", "--overwrite"):
        result = run_cli("judge", "--db", db_path, mode)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == ("Judged 0 calls: nothing to judge (no rollouts of "
                                         "sweep 'small' in scope).")
    assert rows(db_path, "SELECT count(*) FROM stage_runs") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM judge_configs") == [(0,)]


def test_follow_waits_for_a_running_generate(db_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--follow with nothing pending yet still starts while a generate run can add rollouts,
    and, before generate has written any rollout, waits --follow-wait for one to start."""
    make_store(db_path, last=0, **SMALL)
    refuse_backends(monkeypatch)
    idle = run_cli("judge", "--db", db_path, "--follow", "--follow-wait", "0")
    assert idle.exit_code == 0 and "nothing to judge" in idle.output
    with pytest.raises(AssertionError, match="backend was built"):
        run_cli("judge", "--db", db_path, "--follow")  # waits for a generate to start
    store = open_store(str(db_path))
    try:
        sweep_id = rows(db_path, "SELECT id FROM sweeps")[0][0]
        with stage_run(store, "generate", {}, sweep_id):
            with pytest.raises(AssertionError, match="backend was built"):
                run_cli("judge", "--db", db_path, "--follow")
            plain = run_cli("judge", "--db", db_path)  # without --follow nothing is waited for
            assert plain.exit_code == 0 and "nothing to judge" in plain.output
    finally:
        store.close()


def test_sweep_rerun_loads_no_judge_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = str(save_tiny_llama(tmp_path / "m"))
    config = config_from_dict({
        "sweep": {"name": "tiny", "model": model, "dtype": "float32", "steer_layer": 1,
                  "patch_layers": "2", "samples": 1, "max_new_tokens": 3,
                  "positive_words": ["Bread"], "negative_words": ["Dust"],
                  "experiments": ["steered_to_unsteered"]},
        "judge": {"backend": "hf", "model": model, "max_new_tokens": 4},
    })
    options = SweepOptions(html=False, export_json=False, progress=False, out_dir=tmp_path / "r")
    store = open_store(str(tmp_path / "s.sqlite"), create=True)
    try:
        first = run_sweep(store, config, options)
        assert first.judged is not None and not first.judged.nothing_pending
        # (Bread and the control's baseline) x 1 sample x coherence and detection
        assert first.judged.calls == first.judged.pending_at_start == 4
        refuse_model_loading(monkeypatch)  # generate has nothing to do either, so loads none
        second = run_sweep(store, config, options)
        assert second.generated is not None and second.generated.rollouts_written == 0
        assert second.judged is not None and second.judged.nothing_pending
        assert second.judged.calls == 0 and second.report is not None
    finally:
        store.close()
