"""Baselines from the store to the page: judged by `judge`, counted by the views and `status`,
merged, exported and imported, and drawn (dashed lines, the false-positive band, --net).

The store holds the small sweep's patched rollouts (every verdict YES) plus one baseline per
target condition, whose answers carry the loopback judge's directives, so every baseline rate
below is counted by hand:

    failure_to_success  Bread  NO on sample 0             3/4
    failure_to_success  Trees  NO on samples 0, 1         2/4
    success_to_failure  Dust   unparsed 0, NO on 1        2/3 (3 scored)
    steered_to_unsteered (none) NO on 0, 1, 2             1/4  the false-positive rate
    unsteered_to_steered Bread all YES                    4/4
    unsteered_to_steered Trees NO on sample 3             3/4
"""

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from conftest import run_cli
from judge_server import FaultServer, fault_server, make_store

from patchdb.report import build_report
from patchdb.report.baselines import net_interval
from patchdb.report.plots import sweep_figure
from patchdb.store import Rollout, open_store
from patchdb.store.migrate import alembic_config
from patchdb.store.sweeps import get_experiments, get_sweep

SAMPLES = 4
# (experiment, target word): the samples answered NO, the sample left unparsed
DIRECTIVES = {
    ("failure_to_success", "Bread"): ({0}, None),
    ("failure_to_success", "Trees"): ({0, 1}, None),
    ("success_to_failure", "Dust"): ({1}, 0),
    ("steered_to_unsteered", ""): ({0, 1, 2}, None),
    ("unsteered_to_steered", "Bread"): (set(), None),
    ("unsteered_to_steered", "Trees"): ({3}, None),
}
# (experiment, target): (n, n_scored, rate), counted by hand from DIRECTIVES
EXPECTED = {
    ("failure_to_success", "Bread"): (4, 4, 0.75),
    ("failure_to_success", "Trees"): (4, 4, 0.5),
    ("success_to_failure", "Dust"): (4, 3, 2 / 3),
    ("steered_to_unsteered", "(none)"): (4, 4, 0.25),
    ("unsteered_to_steered", "Bread"): (4, 4, 1.0),
    ("unsteered_to_steered", "Trees"): (4, 4, 0.75),
}


def _answer(experiment: str, target: str, sample: int) -> str:
    no, unparsed = DIRECTIVES[(experiment, target)]
    word = target or "nothing"
    if sample == unparsed:
        return f"I notice {word}. ({experiment} {sample}) [[reply=none]]"
    if sample in no:
        return f"I notice {word}. ({experiment} {sample}) [[reply=NO]]"
    return f"I notice {word}. ({experiment} {sample})"


def add_baselines(db: Path) -> None:
    """The six baseline units' rollouts, inserted as generate writes them (patch layer -1)."""
    store = open_store(str(db))
    try:
        def fill(session) -> None:  # type: ignore[no-untyped-def]
            experiments = {e.name: e.id for e in get_experiments(session, get_sweep(session, None))}
            for (experiment, target) in DIRECTIVES:
                for i in range(SAMPLES):
                    session.add(Rollout(experiment_id=experiments[experiment], patch_layer=-1,
                                        source_word="", target_word=target, sample_index=i,
                                        answer=_answer(experiment, target, i), n_tokens=5,
                                        finish_reason="length", seed=i))
        store.transact(fill)
    finally:
        store.close()


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server() as srv:
        yield srv


@pytest.fixture
def judged(tmp_path: Path, server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The small sweep with baselines, judged by the loopback judge through `patchdb judge`."""
    monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", server.base_url)
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-test")
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    db = tmp_path / "store.sqlite"
    make_store(db, samples=SAMPLES)
    add_baselines(db)
    result = run_cli("judge", "--db", str(db), "--no-progress")
    assert result.exit_code == 0, result.output
    return db


def baseline_view(db: Path) -> dict[tuple[str, str], tuple[int, int, float]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT experiment, target, n, n_scored, rate FROM baseline_rates")
        return {(e, t): (n, k, rate) for e, t, n, k, rate in rows}


def assert_expected(found: dict[tuple[str, str], tuple[int, int, float]]) -> None:
    assert set(found) == set(EXPECTED)
    for key, (n, n_scored, rate) in EXPECTED.items():
        assert found[key][:2] == (n, n_scored), key
        assert math.isclose(found[key][2], rate), key


def test_judge_sends_each_baseline_to_its_experiments_graders(judged: Path,
                                                               server: FaultServer) -> None:
    with sqlite3.connect(judged) as conn:
        graders = conn.execute(
            "SELECT e.name, r.target_word, j.grader, COUNT(*) FROM judgments j "
            "JOIN rollouts r ON r.id = j.rollout_id JOIN experiments e ON e.id = r.experiment_id "
            "WHERE r.patch_layer = -1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").fetchall()
    assert graders == [
        ("failure_to_success", "Bread", "coherence", 4),
        ("failure_to_success", "Bread", "detection_identification", 4),
        ("failure_to_success", "Trees", "coherence", 4),
        ("failure_to_success", "Trees", "detection_identification", 4),
        ("steered_to_unsteered", "", "coherence", 4),
        ("steered_to_unsteered", "", "detection", 4),
        ("success_to_failure", "Dust", "coherence", 4),
        ("success_to_failure", "Dust", "detection_identification", 4),
        ("unsteered_to_steered", "Bread", "coherence", 4),
        ("unsteered_to_steered", "Bread", "detection", 4),
        ("unsteered_to_steered", "Trees", "coherence", 4),
        ("unsteered_to_steered", "Trees", "detection", 4),
    ]
    # the identification question about a baseline names its target word
    prompts = [m["content"] for b in server.stats.bodies for m in b["messages"]]
    asked = [p for p in prompts if "(failure_to_success 3)" in p and "Bread" in p]
    assert len(asked) == 2  # coherence and detection+identification of Bread's sample 3


def test_views_keep_baselines_out_of_layer_rates(judged: Path) -> None:
    assert_expected(baseline_view(judged))
    with sqlite3.connect(judged) as conn:
        layers = conn.execute("SELECT DISTINCT patch_layer FROM layer_rates ORDER BY 1").fetchall()
        rates = conn.execute("SELECT COUNT(*), MIN(n), MAX(n), MIN(rate), MAX(rate) "
                             "FROM layer_rates").fetchone()
        layer = conn.execute("SELECT DISTINCT patch_layer FROM sample_scores "
                             "WHERE source_word = '' AND target_word = ''").fetchall()
    assert layers == [(2,), (3,)]
    assert rates == (16, SAMPLES, SAMPLES, 1.0, 1.0)  # 8 keys x 2 layers, every verdict YES
    assert layer == [(-1,)]  # sample_scores keeps every rollout; -1 marks the baseline


def test_status_counts_the_baselines(judged: Path) -> None:
    result = run_cli("status", "--db", str(judged), "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["experiment"], r["patch_layer"]): r for r in json.loads(result.output)["layers"]}
    # targets per experiment: 2 positive, 1 negative, none, 2 positive
    for experiment, targets in (("failure_to_success", 2), ("success_to_failure", 1),
                                ("steered_to_unsteered", 1), ("unsteered_to_steered", 2)):
        row = rows[(experiment, -1)]
        assert row["rollouts_expected"] == row["rollouts_present"] == targets * SAMPLES
        assert row["judgments_expected"] == 2 * targets * SAMPLES
    assert rows[("success_to_failure", -1)]["unparsed"] == 2  # both graders of sample 0
    text = run_cli("status", "--db", str(judged)).output
    assert any(line.split()[:2] == ["failure_to_success", "base"] for line in text.splitlines())


def test_status_expects_baselines_before_generate(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    make_store(db, samples=SAMPLES)  # patched rollouts only
    rows = json.loads(run_cli("status", "--db", str(db), "--json").output)["layers"]
    base = [(r["experiment"], r["rollouts_present"], r["rollouts_expected"])
            for r in rows if r["patch_layer"] == -1]
    assert base == [("failure_to_success", 0, 8), ("success_to_failure", 0, 4),
                    ("steered_to_unsteered", 0, 4), ("unsteered_to_steered", 0, 8)]


def test_judge_dry_run_counts_baselines_on_their_own_rows(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    make_store(db, samples=SAMPLES)
    add_baselines(db)
    result = run_cli("judge", "--db", str(db), "--dry-run", "--base-url", "http://127.0.0.1:9")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("failure_to_success"))
    # 2 targets x 4 samples x 1 "layer" x 2 graders = 16 calls, all to send now
    assert lines[first + 1].split() == ["baseline", "2", "4", "1", "2", "16", "0", "16", "0"]
    # the patched keys alone: (Dust, Bread) and (Dust, Trees) x 4 samples x 2 layers x 2 graders
    assert lines[first].split()[1:6] == ["2", "4", "2", "2", "32"]


def test_merge_carries_the_baselines(judged: Path, tmp_path: Path) -> None:
    into = tmp_path / "merged.sqlite"
    result = run_cli("merge", str(judged), "--db", str(into))
    assert result.exit_code == 0, result.output
    assert_expected(baseline_view(into))
    again = run_cli("merge", str(judged), "--db", str(into))
    assert again.exit_code == 0, again.output
    with sqlite3.connect(into) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rollouts WHERE patch_layer = -1").fetchone() == (
            6 * SAMPLES,)


def test_export_writes_a_baseline_folder_and_import_reads_it_back(judged: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "tree"
    result = run_cli("report", "--db", str(judged), "--export-json", "--out", str(out))
    assert result.exit_code == 0, result.output
    f2s = out / "failure_to_success"
    assert sorted(p.name for p in f2s.iterdir() if p.is_dir()) == ["baseline", "layer_2",
                                                                   "layer_3"]
    rollouts = json.loads((f2s / "baseline" / "rollouts.json").read_text())
    assert list(rollouts) == ["Bread", "Trees"]
    assert rollouts["Trees"][1] == _answer("failure_to_success", "Trees", 1)
    # the pair experiments' detection+identification verdicts, under the plan's file name
    verdicts = json.loads((f2s / "baseline" / "judgments_detection.json").read_text())
    assert verdicts["Bread"] == [False, True, True, True]
    assert json.loads((f2s / "baseline" / "judge_scores.json").read_text()) == {
        "Bread": 0.75, "Trees": 0.5}
    assert list(json.loads((f2s / "all_layer_scores.json").read_text())) == ["2", "3"]
    control = out / "steered_to_unsteered" / "baseline"
    assert json.loads((control / "judge_scores.json").read_text()) == {"(none)": 0.25}

    fresh = tmp_path / "imported.sqlite"
    imported = run_cli("import-json", str(out), "--db", str(fresh), "--sweep", "again",
                       "--steer-layer", "1")
    assert imported.exit_code == 0, imported.output
    assert_expected(baseline_view(fresh))
    with sqlite3.connect(fresh) as conn:  # -1 is not taken for a patch layer
        config = json.loads(conn.execute("SELECT config_json FROM sweeps").fetchone()[0])
    assert config["patch_layers"] == "2-3"
    twice = run_cli("import-json", str(out), "--db", str(fresh), "--sweep", "again",
                    "--steer-layer", "1")
    assert twice.exit_code == 0, twice.output
    assert_expected(baseline_view(fresh))


def test_labels_of_baselines_travel_through_the_baseline_folder(judged: Path,
                                                                  tmp_path: Path) -> None:
    with sqlite3.connect(judged) as conn:
        [(rid,)] = conn.execute(
            "SELECT r.id FROM rollouts r JOIN experiments e ON e.id = r.experiment_id "
            "WHERE e.name = 'steered_to_unsteered' AND r.patch_layer = -1 AND r.sample_index = 2")
        conn.execute("INSERT INTO labels (rollout_id, grader, labeler, label, created_at) "
                     "VALUES (?, 'detection', 'ada', 0, '2026-12-01 00:00:00')", (rid,))
    out = tmp_path / "tree"
    assert run_cli("report", "--db", str(judged), "--export-json", "--out", str(out)).exit_code == 0
    written = json.loads((out / "steered_to_unsteered" / "baseline" / "labels_detection.json")
                         .read_text())
    assert [(key, [(e["sample"], e["label"]) for e in entries])
            for key, entries in written.items()] == [("(none)", [(2, False)])]
    fresh = tmp_path / "imported.sqlite"
    imported = run_cli("import-json", str(out), "--db", str(fresh), "--steer-layer", "1")
    assert imported.exit_code == 0, imported.output
    with sqlite3.connect(fresh) as conn:
        assert conn.execute(
            "SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index, "
            "l.grader, l.label FROM labels l JOIN rollouts r ON r.id = l.rollout_id "
            "JOIN experiments e ON e.id = r.experiment_id").fetchall() == [
            ("steered_to_unsteered", -1, "", "", 2, "detection", 0)]


def test_plot_draws_each_baseline_dashed_and_the_false_positive_rate(judged: Path) -> None:
    store = open_store(str(judged))
    try:
        report = build_report(store, None, out_dir=judged.parent / "report")
    finally:
        store.close()
    by_name = {e.name: e for e in report.experiments}
    rates = by_name["failure_to_success"].rates
    fig = sweep_figure(rates, "t")
    ax = fig.axes[0]
    bold = {line.get_label(): line.get_color() for line in ax.lines
            if line.get_label() in ("Bread", "Trees")}
    dashed = [(line.get_ydata()[0], line.get_color()) for line in ax.lines
              if line.get_linestyle() == "--" and len(line.get_ydata()) == 2]
    assert sorted(dashed) == sorted([(0.75, bold["Bread"]), (0.5, bold["Trees"])])
    dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert [tuple(line.get_ydata()) for line in dotted] == [(0.25, 0.25)]
    assert {"Unpatched", "False pos. 25% (Wilson, 4 samples)"} <= {
        " ".join(t.get_text().split()) for t in ax.get_legend().get_texts()}

    table = by_name["failure_to_success"].table.splitlines()
    assert table[1].split()[:3] == ["word", "base", "|"]
    assert table[3].split()[:3] == ["Bread", "75", "|"]
    assert table[4].split()[:3] == ["Trees", "50", "|"]
    assert "False positives (no injection, no patch): 25% (1/4;" in by_name[
        "failure_to_success"].table
    single = by_name["unsteered_to_steered"].table.splitlines()
    mean = next(line for line in single if line.startswith("Mean"))
    assert mean.split()[:3] == ["Mean", "88", "|"]  # (100 + 75) / 2 = 87.5


def test_net_plot_subtracts_the_false_positive_rate(judged: Path) -> None:
    store = open_store(str(judged))
    try:
        report = build_report(store, None, out_dir=judged.parent / "report", net=True, ci=True)
    finally:
        store.close()
    rates = next(e.rates for e in report.experiments if e.name == "unsteered_to_steered")
    ax = sweep_figure(rates, "t", ci=True, net=True).axes[0]
    mean = next(line for line in ax.lines if line.get_label() == "Mean")
    assert list(mean.get_ydata()) == [0.75, 0.75]  # every patched verdict YES: 1 - 0.25
    dotted = next(line for line in ax.lines if line.get_linestyle() == ":")
    assert tuple(dotted.get_ydata()) == (0.0, 0.0)
    dashed = sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"
                    and len(line.get_ydata()) == 2)
    assert dashed == [0.5, 0.75]  # Trees 0.75 - 0.25, Bread 1.0 - 0.25
    assert ax.get_ylim() == pytest.approx((-0.29, 0.79))  # -0.25 to 0.75 with a margin


def test_net_without_a_control_is_one_error(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    make_store(db, samples=SAMPLES)  # no baselines, no judgments
    result = run_cli("report", "--db", str(db), "--net", "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert result.output.startswith("Error: --net needs the false-positive rate: the "
                                    "no-injection control (steered_to_unsteered's baseline")
    assert len(result.output.strip().splitlines()) == 1


def _wilson(k: int, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out again, for the expected values."""
    p = k / n
    centre = (2 * k + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(z * z + 4 * k * (1 - p)) / (2 * (n + z * z))
    return centre - half, centre + half


def test_net_interval_is_newcombes_hybrid_score_interval() -> None:
    from patchdb.report.baselines import Baseline

    control = Baseline("steered_to_unsteered", "", 20, 20, 3)  # 3/20
    lower, upper = net_interval([0.6], [40.0], control)  # 24/40
    l1, u1 = _wilson(24, 40)
    l2, u2 = _wilson(3, 20)
    d = 24 / 40 - 3 / 20
    assert math.isclose(lower[0], d - math.sqrt((0.6 - l1) ** 2 + (u2 - 0.15) ** 2))
    assert math.isclose(upper[0], d + math.sqrt((u1 - 0.6) ** 2 + (0.15 - l2) ** 2))
    assert lower[0] < d < upper[0]


def test_html_page_has_the_unpatched_row(judged: Path, tmp_path: Path) -> None:
    result = run_cli("report", "--db", str(judged), "--html", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").read_text()
    # each target's unpatched rate is one condition: its Wilson band over its 4 samples
    bread, trees = _wilson(3, 4), _wilson(2, 4)
    def percent(x: float) -> str:  # the terminal's form: whole percent
        return f"{round(100 * x)}"

    assert ('<tr class="baseline"><th title="the same target condition with no patch">'
            f'unpatched</th><td>75<span class="band">{percent(bread[0])}-{percent(bread[1])}'
            f'</span></td><td>50<span class="band">{percent(trees[0])}-{percent(trees[1])}'
            '</span></td></tr>') in page
    assert ("False positives (no injection, no patch): 25% (1/4; 95% band 5-70%: Wilson over "
            "its samples, one condition)") in page


def test_downgrade_drops_the_baselines_and_upgrade_brings_the_views_back(judged: Path) -> None:
    store = open_store(str(judged))
    cfg = alembic_config(store.url)
    try:
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0004")
        with sqlite3.connect(judged) as conn:
            assert conn.execute("SELECT COUNT(*) FROM rollouts WHERE patch_layer = -1"
                                ).fetchone() == (0,)
            views = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='view'")}
            assert "baseline_rates" not in views
            assert conn.execute("SELECT COUNT(*) FROM layer_rates").fetchone() == (16,)
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        store.close()
    assert baseline_view(judged) == {}
