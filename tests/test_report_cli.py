"""`patchdb report` as a user runs it: the table, the judge config it reads, its folders."""

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_import_json import cli, write_tree

from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.models import Experiment


@pytest.fixture
def imported(tmp_path: Path, db_path: Path) -> Path:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    return db_path


def test_report_prints_a_table_per_experiment(imported: Path) -> None:
    result = cli("report", "--db", imported)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("Sweep patching_layer_sweep: rates from judge config #1 (import: imported, "
                        "reasoning none, templates import-v1): 21 scored samples.")
    assert ("unsteered_to_steered: rate in % by patch layer (per word; - = nothing scored)"
            in lines)
    header = lines.index("unsteered_to_steered: rate in % by patch layer "
                         "(per word; - = nothing scored)") + 1
    assert lines[header].split() == ["word", "40", "41", "42", "best", "worst"]
    rows = {line.split()[0]: line.split() for line in lines[header + 2: header + 6]}
    assert rows["Bread"][:4] == ["Bread", "67", "67", "-"]  # 2 of 3 scored samples, then a gap
    assert rows["Trees"][1:] == ["-"] * 5  # nothing scorable: gaps, no best or worst
    assert rows["Mean"][1] == "58"
    # the tree holds 17 + 11 unparsed verdicts, no judgments at layer 42, 2 of 3 samples per pair
    assert lines[header + 6] == (
        "Not all scored: 11 of 36 verdicts unparsed: see `patchdb status`; `patchdb judge "
        "--retry-unparsed`; 18 of 54 judge calls not made yet: `patchdb judge`")
    assert "failure_to_success: rate in % by patch layer (mean over source words; " \
           "- = nothing scored)" in lines
    assert "Plot: patchdb_report/patching_layer_sweep/failure_to_success/sweep_plot.png" in lines


def test_best_and_worst_layer(imported: Path) -> None:
    output = cli("report", "--db", imported, "--experiments", "unsteered_to_steered").output
    cafe = next(line for line in output.splitlines() if line.startswith("Café"))
    assert cafe.split()[4:] == ["40", "(50%)", "41", "(0%)"]


def _second_judge(db: Path, verdict: bool) -> int:
    """A second judge config that judged the single-word experiment's layer 40 only."""
    store = open_store(str(db))

    def add(s: Session) -> int:
        config = JudgeConfig(model="openai/gpt-5-nano", reasoning="medium",
                             template_version="v1", backend="openai")
        s.add(config)
        s.flush()
        rollouts = s.scalars(select(Rollout.id).join(Experiment).where(
            Experiment.name == "unsteered_to_steered", Rollout.patch_layer == 40)).all()
        for rid in rollouts:
            for grader in ("coherence", "detection"):
                s.add(Judgment(rollout_id=rid, grader=grader, judge_config_id=config.id,
                               verdict=verdict))
        return int(config.id)

    try:
        return store.transact(add)
    finally:
        store.close()


def test_the_judge_config_with_most_judgments_is_the_default(imported: Path) -> None:
    other = _second_judge(imported, verdict=True)
    result = cli("report", "--db", imported, "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        "Sweep patching_layer_sweep: rates from judge config #1 (import: imported, reasoning "
        "none, templates import-v1): 21 scored samples, the most of 2 judge configs (#2 has 9; "
        "choose with --judge-config).")
    chosen = cli("report", "--db", imported, "--experiments", "unsteered_to_steered",
                 "--judge-config", other, "--export-json", "--out", "other")
    assert chosen.exit_code == 0, chosen.output
    assert chosen.output.startswith(
        f"Sweep patching_layer_sweep: rates from judge config #{other} (openai: openai/gpt-5-nano, "
        "reasoning medium, templates v1): 9 scored samples (chosen with --judge-config).")
    mean = next(line for line in chosen.output.splitlines() if line.startswith("Mean"))
    assert mean.split()[1:4] == ["100", "-", "-"]
    scores = json.loads(Path("other/unsteered_to_steered/all_layer_scores.json").read_text())
    assert scores == {"40": {"Bread": 1.0, "Trees": 1.0, "Café": 1.0}}


def test_an_unknown_judge_config_is_one_line(imported: Path) -> None:
    result = cli("report", "--db", imported, "--judge-config", "7")
    assert result.exit_code == 1
    assert result.output == ("Error: judge config 7 has no judgments in sweep "
                             "'patching_layer_sweep' (configs with judgments: 1)\n")


def test_an_unknown_experiment_is_one_line(imported: Path) -> None:
    result = cli("report", "--db", imported, "--experiments", "success_to_failure")
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown experiment 'success_to_failure'")


def test_a_sweep_with_no_rollouts_reports_gaps(db_path: Path) -> None:
    assert cli("init", "--db", db_path).exit_code == 0
    result = cli("report", "--db", db_path, "--export-json")
    assert result.exit_code == 0, result.output
    assert "rates from no judgments yet" in result.output
    assert "failure_to_success: no rollouts yet" in result.output
    plot = Path("patchdb_report/default/failure_to_success/sweep_plot.png")
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_a_sweep_name_never_escapes_the_report_folder(tmp_path: Path, db_path: Path) -> None:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    imported = cli("import-json", tree, "--db", db_path, "--sweep", "../../evil/x")
    assert imported.exit_code == 0, imported.output
    assert imported.output.startswith("Sweep '../../evil/x' registered: ")
    result = cli("report", "--db", db_path, "--export-json")
    assert result.exit_code == 0, result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".png")]
    outside = [p for p in written if not p.is_relative_to(tmp_path / "patching_layer_sweep")]
    assert outside
    assert all(p.is_relative_to(tmp_path / "patchdb_report" / "evil_x") for p in outside)


def test_html_flag_prints_the_page(imported: Path) -> None:
    pytest.importorskip("patchdb.report.html")
    result = cli("report", "--db", imported, "--html", "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("HTML report: "))
    assert Path(line.removeprefix("HTML report: ")).is_file()
