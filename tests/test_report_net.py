"""`report --net` says what it drew and writes its own file (issue #27): the net plot goes to
sweep_plot_net.<format> (sweep_plot_net_random_vector.<format> with --against random_vector),
sweep_plot.<format> is left as it was, and the net table under the rate table gives each line's
rate minus the reference with the band of that difference.

The store is word_store's hand-counted sweep on patch layers 20 and 28, imported with
`patchdb import-json`; every expected number below is computed here from those counts.
"""

import json
from pathlib import Path

from conftest import file_digest, run_cli
from test_report_bands import FALSE_POSITIVE, newcombe, over_words, wilson
from word_store import hand_sweep, import_sweep, write_sweep

EXPERIMENTS = ("failure_to_success", "steered_to_unsteered", "unsteered_to_steered")


def pct(value: float) -> str:
    return str(round(100 * value))


def _store(tmp_path: Path) -> Path:
    db = tmp_path / "store.sqlite"
    import_sweep(db, hand_sweep(tmp_path / "tree", layers=(20, 28)), "hand")
    return db


def test_net_writes_its_own_plot_and_leaves_the_sweep_plot_alone(tmp_path: Path) -> None:
    db, out = _store(tmp_path), tmp_path / "r"
    plain = run_cli("report", "--db", str(db), "--out", str(out))
    assert plain.exit_code == 0, plain.output
    before = {e: file_digest(out / e / "sweep_plot.png") for e in EXPERIMENTS}
    result = run_cli("report", "--db", str(db), "--out", str(out), "--net")
    assert result.exit_code == 0, result.output
    for e in EXPERIMENTS:
        assert file_digest(out / e / "sweep_plot.png") == before[e]
        assert (out / e / "sweep_plot_net.png").read_bytes()[:4] == b"\x89PNG"
        assert f"Plot: {out / e / 'sweep_plot_net.png'}" in result.output.splitlines()
    assert "sweep_plot.png" not in result.output


def test_net_alone_writes_no_sweep_plot(tmp_path: Path) -> None:
    db, out = _store(tmp_path), tmp_path / "r"
    assert run_cli("report", "--db", str(db), "--out", str(out), "--net").exit_code == 0
    assert sorted(p.name for p in (out / "unsteered_to_steered").iterdir()
                  if p.name.startswith("sweep_plot")) == ["sweep_plot_net.png"]


def test_net_prints_the_net_table_with_the_band_of_the_difference(tmp_path: Path) -> None:
    db = _store(tmp_path)
    result = run_cli("report", "--db", str(db), "--out", str(tmp_path / "r"), "--net")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    control = wilson(FALSE_POSITIVE, 100)

    # unsteered_to_steered: Bread, Trees, Origami score 10, 0, 25 of 100 at layer 20 and
    # 60, 90, 30 at layer 28; the Mean line's band is over the three words
    start = lines.index("unsteered_to_steered, net: rate minus false positives in % by patch "
                        "layer (per word; - = nothing scored)")
    table = lines[start: start + 12]
    assert table[1].split() == ["word", "20", "28"]
    rows = {line.split()[0]: line.split()[1:] for line in table[3:]}
    assert rows["Bread"] == [pct(0.10 - FALSE_POSITIVE), pct(0.60 - FALSE_POSITIVE)]
    assert rows["Trees"] == [pct(0.0 - FALSE_POSITIVE), pct(0.90 - FALSE_POSITIVE)]
    assert rows["Origami"] == [pct(0.25 - FALSE_POSITIVE), pct(0.30 - FALSE_POSITIVE)]
    means = (0.35 / 3, 1.8 / 3)
    assert rows["Mean"] == [pct(m - FALSE_POSITIVE) for m in means]
    bands = [newcombe(m, over_words(words, 100), FALSE_POSITIVE, control)
             for m, words in zip(means, ([0.10, 0.0, 0.25], [0.60, 0.90, 0.30]), strict=True)]
    assert rows["lower"] == [pct(b[0]) for b in bands]
    assert rows["upper"] == [pct(b[1]) for b in bands]
    assert "lower, upper: the 95% band of the difference (Wilson-t over 3 words minus false " \
           "positives (Newcombe); docs/statistics.md)" in table
    assert any(line.startswith("Subtracted: False positives (no injection, no patch): 29% "
                               "(29/100;") for line in table)

    # failure_to_success, Bread: sources Dust, Milk, Rubber score 20, 10, 0 then 60, 80, 40
    start = lines.index("failure_to_success, net: rate minus false positives in % by patch "
                        "layer (mean over source words; - = nothing scored)")
    bread = lines[start + 3].split()
    assert bread == ["Bread", pct(0.1 - FALSE_POSITIVE), pct(0.6 - FALSE_POSITIVE)]


def _random_vector_store(tmp_path: Path) -> Path:
    """failure_to_success at layers 20 and 28 with a random-vector folder (6 of 20 claim)."""
    root = write_sweep(tmp_path / "tree", {
        "failure_to_success": {20: {"Dust_to_Bread": (6, 10), "Dust_to_Trees": (2, 10)},
                               28: {"Dust_to_Bread": (8, 10), "Dust_to_Trees": (4, 10)}},
        "steered_to_unsteered": {20: {"Bread": (5, 10)}, 28: {"Bread": (5, 10)}},
    }, {"failure_to_success": {"Bread": (3, 10), "Trees": (1, 10)},
        "steered_to_unsteered": {"(none)": (1, 10)}})
    folder = root / "failure_to_success" / "random_vector"
    folder.mkdir()
    for name, per_key in (("rollouts", lambda k: [f"a{i}" for i in range(10)]),
                          ("judgments_coherence", lambda k: [True] * 10),
                          ("judgments_detection_identification",
                           lambda k: [True] * k + [False] * (10 - k))):
        (folder / f"{name}.json").write_text(json.dumps(
            {key: per_key(k) for key, k in (("Bread", 2), ("Trees", 4))}))
    db = tmp_path / "w.sqlite"
    import_sweep(db, root, "w")
    return db


def test_net_against_the_random_vector_has_its_own_file_and_says_so(tmp_path: Path) -> None:
    db, out = _random_vector_store(tmp_path), tmp_path / "r"
    result = run_cli("report", "--db", str(db), "--out", str(out), "--net", "--against",
                     "random_vector")
    assert result.exit_code == 0, result.output
    folder = out / "failure_to_success"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("sweep_plot")) == [
        "sweep_plot_net_random_vector.png"]
    assert f"Plot: {folder / 'sweep_plot_net_random_vector.png'}" in result.output.splitlines()
    lines = result.output.splitlines()
    start = lines.index("failure_to_success, net: rate minus random vector in % by patch layer "
                        "(mean over source words; - = nothing scored)")
    # the random-vector rate pools both words: (2 + 4) / 20 = 0.3
    assert lines[start + 3].split() == ["Bread", pct(0.6 - 0.3), pct(0.8 - 0.3)]
    assert lines[start + 4].split()[0] == "lower"  # under the bold line: its band
    # steered_to_unsteered has no target word and no random vector: it keeps the control
    assert "steered_to_unsteered, net: rate minus false positives in % by patch layer " \
           "(per word; - = nothing scored)" in lines
