"""Dose series: a config with a list for strength or steer_layer is one sweep per value, named
predictably; `--sweep GLOB` runs generate, judge and report over all of them, and `patchdb
sweep` runs the series end to end and draws it together."""

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import file_digest, run_cli
from tiny_models import save_tiny_llama

from patchdb.config import series_from_dict
from patchdb.configs import resolve_config
from patchdb.errors import ConfigError

TINY = """
[sweep]
name = "d"
model = "./m"
dtype = "float32"
steer_layer = 1
strength = [2.0, 6]
patch_layers = "2,4"
samples = {samples}
max_new_tokens = 4
positive_words = ["Bread"]
negative_words = ["Dust"]
experiments = ["unsteered_to_steered", "failure_to_success"]

[judge]
backend = "hf"
model = "./m"
reasoning = "none"
max_attempts = 1
max_new_tokens = 4
verdict = "logprobs"
"""


def write(text: str, **values: Any) -> Path:
    path = Path("dose.toml")
    path.write_text(text.format(**{"samples": 1, **values}))
    return path


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_lists_make_one_sweep_per_value_with_predictable_names() -> None:
    series = series_from_dict({"sweep": {"name": "s", "strength": [4, 8.5],
                                         "steer_layer": [18, 20], "patch_layers": "22"}})
    assert series.name == "s" and series.varied == ["steer_layer", "strength"]
    assert [(c.name, c.steer_layer, c.strength) for c in series.configs] == [
        ("s-steer18-strength4", 18, 4.0), ("s-steer18-strength8.5", 18, 8.5),
        ("s-steer20-strength4", 20, 4.0), ("s-steer20-strength8.5", 20, 8.5)]
    one = series_from_dict({"sweep": {"name": "s", "steer_layer": [10], "patch_layers": "22"}})
    assert [c.name for c in one.configs] == ["s-steer10"]
    plain = series_from_dict({"sweep": {"name": "s"}})
    assert not plain.is_series and [c.name for c in plain.configs] == ["s"]


@pytest.mark.parametrize(("sweep", "error"), [
    ({"strength": []}, "[sweep] strength is an empty list (give one value or several)"),
    ({"strength": [4, 4.0]}, "[sweep] strength lists 4 twice"),
    ({"strength": [4, "8"]}, "[sweep] strength must be a number, got '8'"),
    ({"steer_layer": [18, 1.5]}, "[sweep] steer_layer must be an integer, got 1.5"),
    ({"samples": [1, 2]}, "[sweep] samples must be an integer, got [1, 2]"),
    ({"steer_layer": [18, 40]},  # every sweep of the series is validated
     "[sweep] patch_layers must all come after steer_layer 40, got '40-60'"),
])
def test_bad_lists_are_refused(sweep: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        series_from_dict({"sweep": sweep})
    assert str(info.value) == error


def test_a_command_that_takes_one_sweep_refuses_a_series() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("demo-dose")
    assert str(info.value) == ("config demo-dose gives a list for strength (a series of 2 "
                               "sweeps); use `patchdb init` or `patchdb sweep` with it")


def test_the_packaged_dose_config() -> None:
    from patchdb.configs import resolve_series

    series = resolve_series("demo-dose")
    assert [(c.name, c.strength) for c in series.configs] == [
        ("demo-dose-strength4", 4.0), ("demo-dose-strength8", 8.0)]
    demo = resolve_config("demo")
    assert all(c.model == demo.model and c.steer_layer == demo.steer_layer
               and c.patch_layers == demo.patch_layers for c in series.configs)


def test_init_registers_the_series_once(db_path: Path) -> None:
    config = write(TINY)
    first = run_cli("init", "--config", config, "--db", db_path)
    assert first.exit_code == 0, first.output
    where = str(db_path)
    assert first.output.splitlines() == [
        "Series 'd': 2 sweeps, one per strength value (select them with --sweep 'd-*').",
        f"Sweep 'd-strength2' registered in {where}: model ./m, 2 experiments, 2 patch layers "
        "(2,4).",
        f"Sweep 'd-strength6' registered in {where}: model ./m, 2 experiments, 2 patch layers "
        "(2,4).",
    ]
    assert rows(db_path, "SELECT name, strength FROM sweeps ORDER BY id") == [
        ("d-strength2", 2.0), ("d-strength6", 6.0)]
    stored = rows(db_path, "SELECT * FROM sweeps ORDER BY id")
    again = run_cli("init", "--config", config, "--db", db_path)
    assert again.exit_code == 0, again.output
    assert [line.split(" in ")[0] for line in again.output.splitlines()[1:]] == [
        "Sweep 'd-strength2' already registered", "Sweep 'd-strength6' already registered"]
    assert rows(db_path, "SELECT * FROM sweeps ORDER BY id") == stored

    # a changed list item is a new sweep beside the others
    changed = run_cli("init", "--config", write(TINY.replace("[2.0, 6]", "[2.0, 7]")),
                      "--db", db_path)
    assert changed.exit_code == 0, changed.output
    assert "Sweep 'd-strength7' registered" in changed.output
    assert rows(db_path, "SELECT name FROM sweeps ORDER BY id") == [
        ("d-strength2",), ("d-strength6",), ("d-strength7",)]

    # another setting changed under the same names: refused by name, and nothing registered,
    # not even the series' new sweep (d-strength9)
    before = file_digest(db_path)
    refused = run_cli("init", "--config", write(TINY.replace("[2.0, 6]", "[9, 2.0]"),
                                                samples=3), "--db", db_path)
    assert refused.exit_code == 1
    assert refused.output == ("Error: sweep 'd-strength2' already exists with a different "
                              "config (samples 1 in the store, 3 in this config); it holds no "
                              "results: remove it with `patchdb sweeps rm d-strength2` and run "
                              "init again, or choose another name\n")
    assert file_digest(db_path) == before


@pytest.fixture
def tiny_series(db_path: Path) -> Path:
    save_tiny_llama(Path("m"), n_layers=6)
    assert run_cli("init", "--config", write(TINY), "--db", db_path).exit_code == 0
    return db_path


def patched_rollouts(db: Path) -> list[tuple[Any, ...]]:
    """Rollouts per sweep at the sweep's patch layers (baselines, if any, apart)."""
    return rows(db, "SELECT s.name, count(*) FROM rollouts r JOIN experiments e ON "
                    "e.id = r.experiment_id JOIN sweeps s ON s.id = e.sweep_id "
                    "WHERE r.patch_layer >= 0 GROUP BY s.name ORDER BY s.name")


def test_generate_judge_and_report_take_a_glob(tiny_series: Path) -> None:
    db = tiny_series
    one = run_cli("generate", "--db", db, "--sweep", "d-strength2", "--quiet")
    assert one.exit_code == 0, one.output
    assert patched_rollouts(db) == [("d-strength2", 4)]  # 2 keys x 2 layers x 1 sample
    both = run_cli("generate", "--db", db, "--sweep", "d-*", "--quiet")
    assert both.exit_code == 0, both.output
    lines = both.output.splitlines()
    assert lines[0] == "== sweep d-strength2"
    assert any(line.startswith("Nothing to generate: all") and "'d-strength2'" in line
               for line in lines)
    assert "== sweep d-strength6" in lines
    assert patched_rollouts(db) == [("d-strength2", 4), ("d-strength6", 4)]

    judged = run_cli("judge", "--db", db, "--sweep", "d-strength[26]", "--no-progress")
    assert judged.exit_code == 0, judged.output
    assert [line for line in judged.output.splitlines() if line.startswith("==")] == [
        "== sweep d-strength2", "== sweep d-strength6"]
    assert rows(db, "SELECT count(*) FROM judgments j JOIN rollouts r ON r.id = j.rollout_id "
                    "WHERE r.patch_layer >= 0") == [(16,)]

    report = run_cli("report", "--db", db, "--sweep", "d-*", "--out", "rep")
    assert report.exit_code == 0, report.output
    for name in ("d-strength2", "d-strength6"):
        assert f"== sweep {name}" in report.output
        assert f"Sweep {name}: rates from judge config #1" in report.output
        assert Path(f"rep/{name}/failure_to_success/sweep_plot.png").exists()


@pytest.mark.parametrize(("command", "pattern", "error"), [
    ("generate", "x*", "Error: no sweep matches 'x*' (sweeps: d-strength2, d-strength6)"),
    ("judge", "d-[", "Error: invalid sweep pattern 'd-[': '[' is never closed "
                     "(sweeps: d-strength2, d-strength6)"),
    ("report", "?", "Error: no sweep matches '?' (sweeps: d-strength2, d-strength6)"),
])
def test_a_glob_matching_nothing_is_one_line(tiny_series: Path, command: str, pattern: str,
                                             error: str) -> None:
    before = file_digest(tiny_series)
    result = run_cli(command, "--db", tiny_series, "--sweep", pattern)
    assert result.exit_code == 1
    assert result.output == error + "\n"
    assert file_digest(tiny_series) == before


def test_sweep_runs_the_series_then_compares_it(db_path: Path) -> None:
    save_tiny_llama(Path("m"), n_layers=6)
    config = write(TINY)
    result = run_cli("sweep", "--config", config, "--db", db_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("==")] == [
        "== sweep d-strength2", "== sweep d-strength6", "== series d: 2 sweeps compared"]
    assert patched_rollouts(db_path) == [("d-strength2", 4), ("d-strength6", 4)]
    series = lines.index("== series d: 2 sweeps compared")
    assert lines[series + 1:series + 3] == [
        "Comparing: d-strength2 (solid line), d-strength6 (dashed line).",
        "Differences: strength 2 vs 6."]
    assert lines[-1] == "Compare: patchdb_report/d/compare.html"
    page = Path("patchdb_report/d/compare.html").read_text()
    assert page.count('<img alt="comparison of rate against patch layer') == 2
    for name in ("d-strength2", "d-strength6"):
        assert Path(f"patchdb_report/{name}/report.html").exists()
        assert f'<a href="../{name}/report.html">{name}</a>' in page
    # again, into --out: nothing new to do; each sweep's report in a sub-folder, the
    # comparison in the folder itself
    again = run_cli("sweep", "--config", config, "--db", db_path, "--out", "out")
    assert again.exit_code == 0, again.output
    assert again.output.count("generate: 0 new rollouts") == 2
    assert again.output.count("judge: nothing missing") == 2
    assert again.output.splitlines()[-1] == "Compare: out/compare.html"
    page = Path("out/compare.html").read_text()
    for name in ("d-strength2", "d-strength6"):
        assert Path(f"out/{name}/unsteered_to_steered/sweep_plot.png").exists()
        assert f'<a href="{name}/report.html">{name}</a>' in page


@pytest.mark.slow
def test_the_packaged_dose_series_runs_offline(tmp_path: Path) -> None:
    """`patchdb sweep --config demo-dose` at its smallest: both strengths, their baselines,
    judged in process by the demo's model, then compared (docs/compare.md). One experiment is
    enough here: the demo's run (test_demo.py) takes all four through the same stages on the
    same model, and test_sweep_runs_the_series_then_compares_it all of them through a series."""
    import subprocess
    import sys

    args = ["sweep", "--config", "demo-dose", "--db", "demo.sqlite", "--layers", "20",
            "--words", "Bread", "--samples", "1", "--max-new-tokens", "8",
            "--experiments", "failure_to_success"]
    run = subprocess.run([sys.executable, "-m", "patchdb", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    db = tmp_path / "demo.sqlite"
    # keys of failure_to_success with Bread: Dust_to_Bread and Milk_to_Bread, one sample, one
    # layer; each rollout (baselines too) has its coherence and its detection judgment
    assert patched_rollouts(db) == [("demo-dose-strength4", 2), ("demo-dose-strength8", 2)]
    assert rows(db, "SELECT count(*) FROM rollouts r WHERE (SELECT count(*) FROM judgments j "
                    "WHERE j.rollout_id = r.id) <> 2") == [(0,)]
    baselines = rows(db, "SELECT s.name, count(*) FROM rollouts r JOIN experiments e ON "
                         "e.id = r.experiment_id JOIN sweeps s ON s.id = e.sweep_id "
                         "WHERE r.patch_layer = -1 GROUP BY s.name ORDER BY s.name")
    assert [name for name, n in baselines if n > 0] == ["demo-dose-strength4",
                                                         "demo-dose-strength8"]
    assert "Differences: strength 4 vs 8." in run.stdout
    page = (tmp_path / "patchdb_report" / "demo-dose" / "compare.html").read_text()
    assert page.count('<img alt="comparison of rate against patch layer') == 1
    for name in ("demo-dose-strength4", "demo-dose-strength8"):
        assert (tmp_path / "patchdb_report" / name / "report.html").exists()
