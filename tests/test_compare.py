"""`patchdb report --compare`: two real small sweeps judged over a real socket, drawn together.

Two sweeps differ only in strength (2 and 6). Their answers carry the loopback judge server's
reply directives, so every verdict, and so every rate below, is written by hand here.
"""

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import file_digest, run_cli
from judge_server import FaultServer, fault_server, make_store
from test_html_report import browser, needs_chromium

from patchdb.report.compare import build_comparison
from patchdb.report.compare_plot import compare_figure
from patchdb.store import open_store

EXPERIMENTS = ["unsteered_to_steered", "failure_to_success"]
# make_store's sweep: model tiny, steer layer 1, patch layers 2-3, 2 samples, words Bread,
# Trees / Dust. Per sweep: 4 keys x 2 layers x 2 samples = 16 rollouts.
NO = " [[reply=NO]]"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    with fault_server() as srv:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
        yield srv


def _say_no(db: Path, sweep: str, experiment: str, layer: int, target: str,
            samples: tuple[int, ...]) -> None:
    """Make the judge answer NO (both graders) for these samples of one key."""
    n = 0
    with sqlite3.connect(db) as conn:
        for sample in samples:
            n += conn.execute(
                "UPDATE rollouts SET answer = answer || ? WHERE patch_layer = ? AND target_word = ? "
                "AND sample_index = ? AND experiment_id = (SELECT e.id FROM experiments e JOIN "
                "sweeps s ON s.id = e.sweep_id WHERE s.name = ? AND e.name = ?)",
                (NO, layer, target, sample, sweep, experiment)).rowcount
    assert n == len(samples)


@pytest.fixture
def two_sweeps(db_path: Path, server: FaultServer) -> Path:
    """Sweeps 'low' (strength 2) and 'high' (strength 6), judged by `judge --sweep '*'`."""
    for name, strength in (("low", 2.0), ("high", 6.0)):
        assert make_store(db_path, name=name, strength=strength, experiments=EXPERIMENTS) == 16
    # low: Bread 100% at 2, 50% at 3 (unsteered_to_steered); Trees 0% at layer 2 (pairs)
    _say_no(db_path, "low", "unsteered_to_steered", 3, "Bread", (1,))
    _say_no(db_path, "low", "failure_to_success", 2, "Trees", (0, 1))
    # high: Trees 50% at layer 3 (unsteered_to_steered); Bread 0% at layer 3 (pairs)
    _say_no(db_path, "high", "unsteered_to_steered", 3, "Trees", (0,))
    _say_no(db_path, "high", "failure_to_success", 3, "Bread", (0, 1))
    judged = run_cli("judge", "--db", db_path, "--sweep", "*")
    assert judged.exit_code == 0, judged.output
    lines = judged.output.splitlines()
    assert [line for line in lines if line.startswith("==")] == ["== sweep low", "== sweep high"]
    assert sum(line.startswith("Judged 32 calls") for line in lines) == 2
    return db_path


def test_compare_prints_differences_and_tables(two_sweeps: Path) -> None:
    result = run_cli("report", "--db", two_sweeps, "--compare", "low", "high", "--html")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Comparing: low (solid line), high (dashed line)."
    assert lines[1] == "Differences: strength 2 vs 6."
    assert lines[2].startswith("Same: model tiny; steer layer 1; prompt not rendered yet; "
                               "judge #1 (openai: openai/gpt-5-nano, reasoning medium, templates ")
    single = lines.index("unsteered_to_steered: rate in % by patch layer (per word; "
                         "- = nothing scored)")
    assert [line.split() for line in lines[single + 1: single + 9]] == [
        ["word", "sweep", "2", "3"],
        ["-" * len(lines[single + 1])],
        ["Bread", "low", "100", "50"], ["Bread", "high", "100", "100"],
        ["Trees", "low", "100", "100"], ["Trees", "high", "100", "50"],
        ["Mean", "low", "100", "75"], ["Mean", "high", "100", "75"],
    ]
    pairs = lines.index("failure_to_success: rate in % by patch layer (mean over source words; "
                        "- = nothing scored)")
    assert [line.split() for line in lines[pairs + 3: pairs + 7]] == [
        ["Bread", "low", "100", "100"], ["Bread", "high", "100", "0"],
        ["Trees", "low", "0", "100"], ["Trees", "high", "100", "100"],
    ]
    out = Path("patchdb_report/compare-low-high")
    assert f"Plot: {out}/unsteered_to_steered/compare_plot.png" in lines
    assert (out / "failure_to_success" / "compare_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert lines[-1] == f"HTML comparison: {out}/compare.html"
    page = (out / "compare.html").read_text()
    assert page.count('<img alt="comparison of rate against patch layer') == 2
    assert "Differences: strength 2 vs 6." in page


def test_the_figure_has_one_line_per_sweep_per_word(two_sweeps: Path) -> None:
    store = open_store(str(two_sweeps))
    try:
        with store.read() as session:
            comparison = build_comparison(session, ["low", "high"])
    finally:
        store.close()
    single = compare_figure(comparison, "unsteered_to_steered").axes[0]
    drawn = {line.get_label(): (line.get_linestyle(), list(line.get_ydata()))
             for line in single.get_lines()}
    assert drawn == {
        "Bread [low]": ("-", [1.0, 0.5]), "Trees [low]": ("-", [1.0, 1.0]),
        "Mean [low]": ("-", [1.0, 0.75]),
        "Bread [high]": ("--", [1.0, 1.0]), "Trees [high]": ("--", [1.0, 0.5]),
        "Mean [high]": ("--", [1.0, 0.75]),
    }
    pairs = compare_figure(comparison, "failure_to_success").axes[0]
    assert sorted(line.get_label() for line in pairs.get_lines()) == [
        "Bread [high]", "Bread [low]", "Trees [high]", "Trees [low]"]
    header = compare_figure(comparison, "failure_to_success").texts[0].get_text()
    assert header.startswith("Differences: strength 2 vs 6.\nSame: model tiny;")


def test_one_sweep_under_two_judge_configs(two_sweeps: Path) -> None:
    again = run_cli("judge", "--db", two_sweeps, "--sweep", "low", "--reasoning", "low")
    assert again.exit_code == 0, again.output
    result = run_cli("report", "--db", two_sweeps, "--compare", "low@judge=1", "low@judge=2",
                     "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Comparing: low@judge=1 (solid line), low@judge=2 (dashed line)."
    # the one difference is the judge: same sweep, same server replies, another reasoning
    assert lines[1].startswith("Differences: judge #1 (openai: openai/gpt-5-nano, reasoning "
                               "medium, templates ")
    assert " vs #2 (openai: openai/gpt-5-nano, reasoning low, templates " in lines[1]
    assert lines[1].count(";") == 0
    assert lines[2] == "Same: model tiny; steer layer 1; strength 2; prompt not rendered yet."
    assert "Bread low@judge=2 100 50".split() in [line.split() for line in lines]


def test_a_glob_compares_every_match(two_sweeps: Path) -> None:
    result = run_cli("report", "--db", two_sweeps, "--compare", "*", "--out", "both")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "Comparing: low (solid line), high (dashed line)."
    assert Path("both/unsteered_to_steered/compare_plot.png").exists()


@pytest.mark.parametrize(("args", "error"), [
    (["low", "nope"], "Error: no sweep named 'nope' in the store (known: high, low)"),
    (["low", "lo[w"], "Error: invalid sweep pattern 'lo[w': '[' is never closed "
                      "(sweeps: low, high)"),
    (["low", "z*"], "Error: no sweep matches 'z*' (sweeps: low, high)"),
    (["low"], "Error: --compare needs two or more sweeps, or one sweep under two judge configs "
              "(SWEEP@judge=ID); low gives only 'low'"),
    (["l*"], "Error: --compare needs two or more sweeps, or one sweep under two judge configs "
             "(SWEEP@judge=ID); l* gives only 'low'"),
    ([], "Error: --compare needs two or more sweeps (names, globs or SWEEP@judge=ID)"),
    (["low", "low@judge=1"], "Error: --compare names sweep 'low' twice under judge config #1 "
                             "(low and low@judge=1)"),
    (["low", "high@judge=9"], "Error: judge config 9 has no judgments in sweep 'high' "
                              "(configs with judgments: 1)"),
    (["low", "high@judge=x"], "Error: invalid --compare item 'high@judge=x': expected SWEEP or "
                              "SWEEP@judge=ID, e.g. demo@judge=2"),
    (["low", "high", "--judge-config", "1"],
     "Error: --judge-config does not apply to --compare (use SWEEP@judge=ID)"),
    (["low", "high", "--net"], "Error: --net does not apply to --compare"),
    (["low", "high", "--experiments", "success_to_failure"],
     "Error: unknown experiment 'success_to_failure': none of the compared sweeps has it"),
])
def test_bad_input_is_one_line_and_changes_nothing(two_sweeps: Path, args: list[str],
                                                   error: str) -> None:
    before = file_digest(two_sweeps)
    result = run_cli("report", "--db", two_sweeps, "--compare", *args)
    assert result.exit_code == 1
    assert result.output == error + "\n"
    assert file_digest(two_sweeps) == before
    assert not Path("patchdb_report").exists()


def test_names_without_compare_are_refused(two_sweeps: Path) -> None:
    result = run_cli("report", "--db", two_sweeps, "low", "high")
    assert result.exit_code == 1
    assert result.output == ("Error: sweep names as arguments (low high) need --compare; to "
                             "report one sweep use --sweep NAME\n")


SINGLE = ["unsteered_to_steered", "steered_to_unsteered"]
# baselines (patch layer -1, 2 samples each), the samples answered NO, per sweep:
#   low:  Bread NO on 0 -> 50%; Trees none -> 100%; control (no steering) NO on 1 -> 50%
#   high: Bread NO on 0, 1 -> 0%; Trees none -> 100%; control NO on 0, 1 -> 0%
BASELINE_NO = {
    "low": {("unsteered_to_steered", "Bread"): {0}, ("unsteered_to_steered", "Trees"): set(),
            ("steered_to_unsteered", ""): {1}},
    "high": {("unsteered_to_steered", "Bread"): {0, 1}, ("unsteered_to_steered", "Trees"): set(),
             ("steered_to_unsteered", ""): {0, 1}},
}


def _add_baselines(db: Path, sweep: str) -> None:
    """The sweep's baseline rollouts, as generate writes them (patch layer -1, source '')."""
    with sqlite3.connect(db) as conn:
        for (experiment, target), no in BASELINE_NO[sweep].items():
            (exp_id,) = conn.execute(
                "SELECT e.id FROM experiments e JOIN sweeps s ON s.id = e.sweep_id "
                "WHERE s.name = ? AND e.name = ?", (sweep, experiment)).fetchone()
            for sample in (0, 1):
                conn.execute(
                    "INSERT INTO rollouts (experiment_id, patch_layer, source_word, target_word, "
                    "sample_index, answer, n_tokens, finish_reason, seed, created_at) "
                    "VALUES (?, -1, '', ?, ?, ?, 5, 'length', ?, '2026-01-01 00:00:00')",
                    (exp_id, target, sample, f"Baseline {sample}." + (NO if sample in no else ""),
                     sample))


def test_baselines_are_drawn_and_tabled_per_sweep(db_path: Path, server: FaultServer) -> None:
    for name, strength in (("low", 2.0), ("high", 6.0)):
        assert make_store(db_path, name=name, strength=strength, experiments=SINGLE) == 16
        _add_baselines(db_path, name)
    assert run_cli("judge", "--db", db_path, "--sweep", "*").exit_code == 0
    result = run_cli("report", "--db", db_path, "--compare", "low", "high",
                     "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = lines.index("unsteered_to_steered: rate in % by patch layer (per word; "
                        "- = nothing scored)")
    assert [line.split() for line in lines[table + 1: table + 12]] == [
        ["word", "sweep", "base", "|", "2", "3"],
        ["-" * len(lines[table + 1])],
        ["Bread", "low", "50", "|", "100", "100"], ["Bread", "high", "0", "|", "100", "100"],
        ["Trees", "low", "100", "|", "100", "100"], ["Trees", "high", "100", "|", "100", "100"],
        ["Mean", "low", "75", "|", "100", "100"], ["Mean", "high", "50", "|", "100", "100"],
        "base: the same target condition with no patch".split(),
        # Wilson 95% intervals: 1/2 -> 0.095-0.905, 0/2 -> 0-0.658 (z^2 / (n + z^2))
        ("low: False positives (no injection, no patch): 50% (1/2; 95% band 9-91%: Wilson "
         "over its samples, one condition)").split(),
        ("high: False positives (no injection, no patch): 0% (0/2; 95% band 0-66%: Wilson "
         "over its samples, one condition)").split(),
    ]
    store = open_store(str(db_path))
    try:
        with store.read() as session:
            comparison = build_comparison(session, ["low", "high"], ["unsteered_to_steered"])
    finally:
        store.close()
    ax = compare_figure(comparison, "unsteered_to_steered").axes[0]
    references = {line.get_label(): (line.get_linestyle(), line.get_ydata()[0])
                  for line in ax.get_lines() if "unpatched" in str(line.get_label())
                  or "false positives" in str(line.get_label())}
    assert references == {
        "Bread unpatched [low]": ("-", 0.5), "Trees unpatched [low]": ("-", 1.0),
        "false positives [low]": ("-", 0.5),
        "Bread unpatched [high]": ("--", 0.0), "Trees unpatched [high]": ("--", 1.0),
        "false positives [high]": ("--", 0.0),
    }


@needs_chromium
def test_the_page_shows_its_figures_in_chromium(two_sweeps: Path) -> None:
    result = run_cli("report", "--db", two_sweeps, "--compare", "low", "high", "--html")
    assert result.exit_code == 0, result.output
    page = Path("patchdb_report/compare-low-high/compare.html").resolve()
    with browser(page.as_uri()) as tools:
        widths = tools.js("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        notes = tools.js("Array.from(document.querySelectorAll('p.note')).map(p => p.textContent)")
        headers = tools.js("Array.from(document.querySelectorAll('table.settings thead th'))"
                           ".map(th => th.textContent)")
    assert len(widths) == 2 and all(w >= 900 for w in widths)  # 11 in at 90 dpi
    assert notes[:2] == ["Comparing: low (solid line), high (dashed line).",
                         "Differences: strength 2 vs 6."]
    assert headers == ["Setting", "low", "high"]


def test_sweeps_from_two_stores_compare_after_merge(tmp_path: Path, server: FaultServer) -> None:
    """One sweep per machine, each judged there; merged into one store, they compare as if
    they had run in one place (the same rates as test_compare_prints_differences_and_tables)."""
    boxes = {"low": tmp_path / "box_low.sqlite", "high": tmp_path / "box_high.sqlite"}
    for (name, db), strength in zip(boxes.items(), (2.0, 6.0), strict=True):
        assert make_store(db, name=name, strength=strength, experiments=EXPERIMENTS) == 16
    _say_no(boxes["low"], "low", "unsteered_to_steered", 3, "Bread", (1,))
    _say_no(boxes["high"], "high", "unsteered_to_steered", 3, "Trees", (0,))
    for db in boxes.values():
        assert run_cli("judge", "--db", db).exit_code == 0
    merged = run_cli("merge", boxes["high"], "--db", boxes["low"])
    assert merged.exit_code == 0, merged.output
    result = run_cli("report", "--db", boxes["low"], "--compare", "low", "high",
                     "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == "Differences: strength 2 vs 6."
    assert lines[2].startswith("Same: model tiny; steer layer 1; prompt not rendered yet; "
                               "judge #1 (openai: openai/gpt-5-nano, reasoning medium, ")
    rows = [line.split() for line in lines[7:13]]
    assert rows == [["Bread", "low", "100", "50"], ["Bread", "high", "100", "100"],
                    ["Trees", "low", "100", "100"], ["Trees", "high", "100", "50"],
                    ["Mean", "low", "100", "75"], ["Mean", "high", "100", "75"]]


def test_every_differing_setting_is_named_once(db_path: Path) -> None:
    """Settings beyond the main five are named too, main ones first, each once."""
    make_store(db_path, name="a", strength=2.0, experiments=EXPERIMENTS)
    make_store(db_path, name="b", strength=6.0, samples=1, temperature=0.5,
               positive_words=["Bread"], experiments=EXPERIMENTS)
    result = run_cli("report", "--db", db_path, "--compare", "a", "b")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:3] == [
        "Comparing: a (solid line), b (dashed line).",
        "Differences: strength 2 vs 6; samples 2 vs 1; temperature 1 vs 0.5; "
        "positive_words Bread, Trees vs Bread.",
        "Same: model tiny; steer layer 1; prompt not rendered yet; judge no judgments yet.",
    ]
    # nothing is judged yet: each sweep says why its rates are missing
    lines = result.output.splitlines()
    pairs = lines.index("failure_to_success: rate in % by patch layer (mean over source words; "
                        "- = nothing scored)")
    assert lines[pairs + 3:pairs + 8] == [
        "Bread a       -   -", "Bread b       -   -", "Trees a       -   -",
        "a: No rates: no judgments yet: run `patchdb judge`",
        "b: No rates: no judgments yet: run `patchdb judge`"]
