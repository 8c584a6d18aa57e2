"""Which judge config report, status, the HTML page and the export read, and why rates are
missing: hand-built stores whose expected numbers are counted by hand in each test."""

import json
from pathlib import Path

from conftest import run_cli
from sqlalchemy.orm import Session
from tiny_models import save_tiny_llama

from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.models import Experiment

CONFIG = """
[sweep]
name = "choice"
model = "smollm2-135m"
dtype = "float32"
steer_layer = 18
patch_layers = "20-21"
samples = 2
max_new_tokens = 8
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
experiments = ["steered_to_unsteered"]
"""
GRADERS = ("coherence", "detection")
# (word, layer, sample) -> (coherent, detected) of the working judge; 6 of the 8 rollouts
WORKING = {
    ("Bread", 20, 0): (True, True), ("Bread", 20, 1): (True, False),
    ("Trees", 20, 0): (True, True), ("Trees", 20, 1): (True, True),
    ("Bread", 21, 0): (False, True), ("Bread", 21, 1): (True, True),
}
WORKING_DESC = "judge config #2 (openai: openai/gpt-5-nano, reasoning medium, templates v1)"


def make_sweep(tmp_path: Path, db: Path, model: str = "smollm2-135m") -> dict[tuple[str, int, int], int]:
    """The sweep with all 8 rollouts and no judgments; returns rollout ids by key."""
    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG.replace('"smollm2-135m"', f'"{model}"'), encoding="utf-8")
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    store = open_store(str(db))

    def fill(s: Session) -> dict[tuple[str, int, int], int]:
        exp = s.query(Experiment).filter_by(name="steered_to_unsteered").one()
        ids = {}
        for word in ("Bread", "Trees"):
            for layer in (20, 21):
                for sample in (0, 1):
                    r = Rollout(experiment_id=exp.id, patch_layer=layer, source_word=word,
                                target_word="", sample_index=sample, answer=f"{word} {sample}")
                    s.add(r)
                    s.flush()
                    ids[(word, layer, sample)] = r.id
        return ids

    try:
        return store.transact(fill)
    finally:
        store.close()


def add_judge(db: Path, model: str, verdicts: dict[int, tuple[bool | None, ...]],
              errors: frozenset[tuple[int, str]] = frozenset(), templates: str = "v1") -> int:
    """A judge config with the given (coherence, detection) verdicts per rollout id; a call in
    `errors` is stored as a judge error instead."""
    store = open_store(str(db))

    def add(s: Session) -> int:
        config = JudgeConfig(model=model, reasoning="medium", template_version=templates,
                             backend="openai")
        s.add(config)
        s.flush()
        for rid, pair in verdicts.items():
            for grader, verdict in zip(GRADERS, pair, strict=True):
                failed = (rid, grader) in errors
                s.add(Judgment(rollout_id=rid, grader=grader, judge_config_id=config.id,
                               verdict=None if failed else verdict,
                               raw_reply=None if failed else "I think so maybe",
                               error="HTTP 500" if failed else None, attempts=1))
        return int(config.id)

    try:
        return store.transact(add)
    finally:
        store.close()


def broken_then_working(tmp_path: Path, db: Path) -> None:
    """Config #1: all 16 calls unparsed (more rows, lower id); config #2: 6 samples parsed."""
    ids = make_sweep(tmp_path, db)
    assert add_judge(db, "broken", {rid: (None, None) for rid in ids.values()}) == 1
    assert add_judge(db, "openai/gpt-5-nano", {ids[k]: v for k, v in WORKING.items()}) == 2


def test_report_status_html_and_export_read_the_working_config(tmp_path: Path,
                                                                db_path: Path) -> None:
    broken_then_working(tmp_path, db_path)
    why = (f"{WORKING_DESC}: 6 scored samples, the most of 2 judge configs (#1 has 0; choose "
           "with --judge-config)")
    report = run_cli("report", "--db", db_path, "--export-json", "--html", "--out", "out")
    assert report.exit_code == 0, report.output
    lines = report.output.splitlines()
    assert lines[0] == f"Sweep choice: rates from {why}."
    # Bread: 20 -> 1/2, 21 -> 1/2; Trees: 20 -> 2/2, 21 unjudged; Mean of the word rates
    assert lines[2] == ("steered_to_unsteered: rate in % by patch layer (per word; "
                        "- = nothing scored)")
    assert [line.split() for line in lines[5:8]] == [
        ["Bread", "50", "50", "20", "(50%)", "20", "(50%)"],
        ["Trees", "100", "-", "20", "(100%)", "20", "(100%)"],
        ["Mean", "75", "50", "20", "(75%)", "21", "(50%)"],
    ]
    assert lines[8] == "Not all scored: 4 of 16 judge calls not made yet: `patchdb judge`"
    scores = json.loads(Path("out/steered_to_unsteered/all_layer_scores.json").read_text())
    assert scores == {"20": {"Bread": 0.5, "Trees": 1.0}, "21": {"Bread": 0.5, "Trees": None}}
    html = Path("out/report.html").read_text(encoding="utf-8")
    assert f"<dt>Judge</dt><dd>{why}</dd>" in html

    status = run_cli("status", "--db", db_path)
    assert f"Judgments counted: {why}" in status.output.splitlines()
    data = json.loads(run_cli("status", "--db", db_path, "--json").output)
    assert data["counted_judge_config"] == 2
    assert (data["totals"]["judged"], data["totals"]["unparsed"]) == (12, 0)


def test_status_takes_judge_config_like_report(tmp_path: Path, db_path: Path) -> None:
    broken_then_working(tmp_path, db_path)
    data = json.loads(run_cli("status", "--db", db_path, "--json", "--judge-config", "1").output)
    assert data["counted_judge_config"] == 1
    assert (data["totals"]["judged"], data["totals"]["unparsed"]) == (0, 16)
    assert data["judge_choice"] == ("judge config #1 (openai: broken, reasoning medium, "
                                    "templates v1): 0 scored samples (chosen with --judge-config)")
    bad = run_cli("status", "--db", db_path, "--judge-config", "9")
    assert bad.exit_code == 1
    assert bad.output == ("Error: judge config 9 has no judgments in sweep 'choice' (configs "
                          "with judgments: 1, 2)\n")


def test_ties_go_to_the_newest_config(tmp_path: Path, db_path: Path) -> None:
    ids = make_sweep(tmp_path, db_path)
    both_yes = {ids[("Bread", 20, 0)]: (True, True), ids[("Bread", 20, 1)]: (True, True)}
    add_judge(db_path, "old", both_yes)
    add_judge(db_path, "new", both_yes)
    data = json.loads(run_cli("status", "--db", db_path, "--json").output)
    assert data["counted_judge_config"] == 2
    report = run_cli("report", "--db", db_path)
    assert report.output.splitlines()[0].startswith("Sweep choice: rates from judge config #2 "
                                                    "(openai: new,")


def test_status_counts_errors_apart_from_unparsed(tmp_path: Path, db_path: Path) -> None:
    """8 rollouts, 16 calls: 3 replies without a verdict, 2 stored errors, 11 parsed."""
    ids = make_sweep(tmp_path, db_path)
    verdicts: dict[int, tuple[bool | None, ...]] = {rid: (True, False) for rid in ids.values()}
    for key in (("Bread", 20, 0), ("Bread", 20, 1), ("Trees", 21, 0)):
        verdicts[ids[key]] = (True, None)  # detection unparsed
    errors = frozenset({(ids[("Trees", 20, 0)], "coherence"), (ids[("Trees", 20, 1)], "detection")})
    add_judge(db_path, "flaky", verdicts, errors)
    data = json.loads(run_cli("status", "--db", db_path, "--json").output)
    assert data["totals"]["judged"] == 11
    assert data["totals"]["unparsed"] == 3
    assert data["totals"]["errors"] == 2
    by_layer = {(r["patch_layer"]): (r["judged"], r["unparsed"], r["errors"])
                for r in data["layers"]}
    assert by_layer == {-1: (0, 0, 0), 20: (4, 2, 2), 21: (7, 1, 0)}  # -1: no baselines yet
    report = run_cli("report", "--db", db_path)
    assert ("Not all scored: 3 of 16 verdicts unparsed: see `patchdb status`; `patchdb judge "
            "--retry-unparsed`; 2 judge errors: `patchdb judge --retry-errors`"
            in report.output.splitlines())


def test_no_judgments_says_run_judge(tmp_path: Path, db_path: Path) -> None:
    make_sweep(tmp_path, db_path)
    report = run_cli("report", "--db", db_path, "--html", "--out", "out")
    assert report.exit_code == 0, report.output
    assert "Sweep choice: rates from no judgments yet." in report.output
    assert "No rates: no judgments yet: run `patchdb judge`" in report.output.splitlines()
    html = Path("out/report.html").read_text(encoding="utf-8")
    assert '<p class="note missing">No rates: no judgments yet: run `patchdb judge`</p>' in html
    assert "No scored samples yet." not in html


def test_all_but_one_verdict_unparsed(tmp_path: Path, db_path: Path) -> None:
    """15 of 16 verdicts unparsed: one parsed coherence verdict scores no sample."""
    ids = make_sweep(tmp_path, db_path)
    verdicts: dict[int, tuple[bool | None, ...]] = {rid: (None, None) for rid in ids.values()}
    verdicts[ids[("Trees", 21, 1)]] = (True, None)
    add_judge(db_path, "chatty", verdicts)
    why = ("No rates: 15 of 16 verdicts unparsed: see `patchdb status`; "
           "`patchdb judge --retry-unparsed`")
    report = run_cli("report", "--db", db_path, "--html", "--out", "out")
    assert why in report.output.splitlines()
    html = Path("out/report.html").read_text(encoding="utf-8")
    assert f'<p class="note missing">{why}</p>' in html


def test_nothing_generated_says_run_generate(tmp_path: Path, db_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG, encoding="utf-8")
    assert run_cli("init", "--config", config, "--db", db_path).exit_code == 0
    report = run_cli("report", "--db", db_path)
    assert "steered_to_unsteered: no rollouts yet: run `patchdb generate`" in report.output


def test_sweep_ends_with_the_rate_table(tmp_path: Path, db_path: Path) -> None:
    """A store with every rollout and judgment: sweep samples and judges nothing (it fills in
    the first-token readouts, which never sample), then prints the table and paths."""
    from patchdb.judge.templates import DEFAULT_TEMPLATES

    # a tiny model with the sweep's layers: the readouts need a model, not SmolLM2
    save_tiny_llama(tmp_path / "m", n_layers=22)
    ids = make_sweep(tmp_path, db_path, model=str(tmp_path / "m"))
    verdicts = {ids[k]: v for k, v in WORKING.items()}
    verdicts[ids[("Trees", 21, 0)]] = (True, False)
    verdicts[ids[("Trees", 21, 1)]] = (True, True)
    version = DEFAULT_TEMPLATES.version
    add_judge(db_path, "openai/gpt-5-nano", verdicts, templates=version)
    result = run_cli("sweep", "--config", tmp_path / "sweep.toml", "--db", db_path, "--out", "out",
                     "--no-baselines")  # nothing to generate: the store has every patched key
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first = lines.index(f"Rates from judge config #1 (openai: openai/gpt-5-nano, reasoning "
                        f"medium, templates {version}): 8 scored samples.")
    assert lines[first + 2] == ("steered_to_unsteered: rate in % by patch layer (per word; "
                                "- = nothing scored)")
    assert [line.split()[:3] for line in lines[first + 5:first + 8]] == [
        ["Bread", "50", "50"], ["Trees", "100", "50"], ["Mean", "75", "50"]]
    # no word has an unpatched baseline here: the layer test says so in one line
    assert lines[first + 8] == ("Layer test: n/a: no word has both a scored rate and a scored "
                                "unpatched baseline")
    assert lines[first + 9] == ""
    assert any(line.endswith("generate: 0 new rollouts, 4 first-token readouts") for line in lines)
    assert "  out/steered_to_unsteered/sweep_plot.png" in lines
    assert "HTML:   out/report.html" in lines


def test_the_choice_counts_the_unpatched_baselines_too(tmp_path: Path, db_path: Path) -> None:
    """Config #1 scores 3 patched samples and 4 baseline ones (7 in all), config #2 6 patched
    ones: #1 has the most scored samples of the sweep, so report (whose one pass over the
    scores also makes its rates) and status both read #1, and #1's rates are what report
    prints. Counting only the patch layers would pick #2."""
    ids = make_sweep(tmp_path, db_path)
    store = open_store(str(db_path))

    def baselines(s: Session) -> list[int]:
        exp = s.query(Experiment).filter_by(name="steered_to_unsteered").one()
        rows = [Rollout(experiment_id=exp.id, patch_layer=-1, source_word="", target_word="",
                        sample_index=sample, answer=f"no injection {sample}")
                for sample in range(4)]  # the no-injection control
        s.add_all(rows)
        s.flush()
        return [int(r.id) for r in rows]

    try:
        unpatched = store.transact(baselines)
    finally:
        store.close()
    first = {rid: (True, False) for rid in unpatched}  # 4 scored, none a success
    first.update({ids[("Bread", 20, 0)]: (True, True), ids[("Bread", 20, 1)]: (True, True),
                  ids[("Trees", 20, 0)]: (True, False)})
    add_judge(db_path, "baseline-heavy", first)
    add_judge(db_path, "openai/gpt-5-nano", {ids[k]: v for k, v in WORKING.items()})
    why = ("judge config #1 (openai: baseline-heavy, reasoning medium, templates v1): 7 scored "
           "samples, the most of 2 judge configs (#2 has 6; choose with --judge-config)")
    report = run_cli("report", "--db", db_path, "--out", "out")
    assert report.exit_code == 0, report.output
    lines = report.output.splitlines()
    assert lines[0] == f"Sweep choice: rates from {why}."
    # #1 at layer 20: Bread 2 of 2, Trees 0 of 1; nothing of #1 at layer 21
    assert [line.split("|")[1].split()[:2] for line in lines[5:8]] == [
        ["100", "-"], ["0", "-"], ["50", "-"]]
    assert json.loads(run_cli("status", "--db", db_path, "--json").output)["judge_choice"] == why
