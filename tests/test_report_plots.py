"""The sweep plots: drawn as docs/science.md describes, then inspected as figure objects and as files."""

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from test_import_json import NEGATIVE, POSITIVE, SINGLE, cli, write_tree

from patchdb.report.aggregate import ExperimentRates, choose_judge_config, experiment_rates
from patchdb.report.plots import sweep_figure
from patchdb.store import open_store
from patchdb.store.sweeps import get_sweep, sweep_config


@pytest.fixture
def rates(tmp_path: Path, db_path: Path) -> dict[str, ExperimentRates]:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    store = open_store(str(db_path))
    try:
        with store.read() as session:
            sweep = get_sweep(session, None)
            judge = choose_judge_config(session, sweep, None)
            found = experiment_rates(session, sweep, sweep_config(sweep),
                                     ["failure_to_success", "unsteered_to_steered"], judge.id)
    finally:
        store.close()
    return {r.name: r for r in found}


def legend_texts(fig: Figure) -> list[str]:
    legend = fig.axes[0].get_legend()
    assert legend is not None
    return [" ".join(t.get_text().split()) for t in legend.get_texts()]  # wrapped on one line


def test_pair_plot(rates: dict[str, ExperimentRates]) -> None:
    fig = sweep_figure(rates["failure_to_success"], "title")
    ax = fig.axes[0]
    faint = [line for line in ax.get_lines() if line.get_alpha() == 0.15]
    bold = [line for line in ax.get_lines() if line.get_alpha() is None]
    assert len(faint) == len(NEGATIVE) * len(POSITIVE)
    assert len(bold) == len(POSITIVE)
    assert len(ax.get_lines()) == len(faint) + len(bold)
    assert legend_texts(fig) == POSITIVE
    # faint lines take their target word's colour
    colour = {b.get_label(): b.get_color() for b in bold}
    assert [f.get_color() for f in faint] == [colour[t] for _ in NEGATIVE for t in POSITIVE]
    assert all(b.get_linewidth() > f.get_linewidth() for b in bold for f in faint)
    assert ax.get_ylim() == pytest.approx((-0.04, 1.04))  # 0 and 1 with a margin
    assert ax.get_ylabel() == "Coherent & Detect+Identify Rate"
    assert ax.get_xlabel() == "Patch layer"
    low, high = ax.get_xlim()
    assert low <= 40 and high >= 42
    assert not ax.collections  # no bands without --ci


def test_single_word_plot(rates: dict[str, ExperimentRates]) -> None:
    fig = sweep_figure(rates["unsteered_to_steered"], "title")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_alpha() for line in lines] == [0.5] * len(SINGLE) + [None]
    assert lines[-1].get_color() == "black"
    assert legend_texts(fig) == [*SINGLE, "Mean"]
    assert ax.get_ylim() == pytest.approx((-0.04, 1.04))  # 0 and 1 with a margin
    assert ax.get_ylabel() == "Coherent & Detect Rate"


def test_gaps_are_nan_never_zero(rates: dict[str, ExperimentRates]) -> None:
    """Trees has no scorable sample at any layer, and layer 42 was never judged."""
    fig = sweep_figure(rates["unsteered_to_steered"], "title")
    by_label = {line.get_label(): line for line in fig.axes[0].get_lines()}
    trees = np.asarray(by_label["Trees"].get_ydata(), dtype=float)
    assert np.isnan(trees).all()
    mean = np.asarray(by_label["Mean"].get_ydata(), dtype=float)
    assert math.isnan(mean[2]) and not math.isnan(mean[0])
    assert mean[0] == pytest.approx((2 / 3 + 0.5) / 2)


def test_ci_adds_one_band_per_bold_line(rates: dict[str, ExperimentRates]) -> None:
    """Over samples every bold line has a band; over words, Trees' line has one scored source
    (Dust_to_Trees has no scorable sample), so no band, and the legend says why."""
    pairs = sweep_figure(rates["failure_to_success"], "title", ci=True,
                         ci_method="samples").axes[0]
    single = sweep_figure(rates["unsteered_to_steered"], "title", ci=True,
                          ci_method="samples").axes[0]
    assert sum(isinstance(c, PolyCollection) for c in pairs.collections) == len(POSITIVE)
    assert sum(isinstance(c, PolyCollection) for c in single.collections) == 1
    assert legend_texts(pairs.figure)[-1] == "95% band: Wilson over samples"
    fig = sweep_figure(rates["failure_to_success"], "title", ci=True)
    assert sum(isinstance(c, PolyCollection) for c in fig.axes[0].collections) == 1
    assert legend_texts(fig)[-1] == "95% band: Wilson-t over 2 sources; n/a: 1 source"


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_plot_files_are_valid_images(tmp_path: Path, db_path: Path, fmt: str) -> None:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    result = cli("report", "--db", db_path, "--format", fmt, "--ci",
                     "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    path = tmp_path / "patchdb_report" / "patching_layer_sweep" / "unsteered_to_steered" / \
        f"sweep_plot.{fmt}"
    assert f"Plot: {path.relative_to(tmp_path)}" in result.output
    data = path.read_bytes()
    if fmt == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    elif fmt == "svg":
        assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"
    else:
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert not (path.parent.parent / "failure_to_success").exists()


BAND_SWEEP = """
[sweep]
name = "band"
model = "smollm2-135m"
steer_layer = 18
patch_layers = "20-21"
samples = 10
max_new_tokens = 8
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
experiments = ["steered_to_unsteered"]
"""


def test_band_contains_its_mean_line(tmp_path: Path, db_path: Path) -> None:
    """At each layer Bread scores 10 of 10 and Trees 0 of 1 (9 replies unparsed): the bold
    line is the mean of the two key rates, 0.5, while the pooled rate is 10/11. A band built
    from pooled counts, Wilson(10, 11) = (0.6226, 0.9838), leaves the line outside; the band
    drawn now is Wilson(0.5) at n_eff = 2^2 / (1/10 + 1/1) = 40/11: (0.1416, 0.8584)."""
    from sqlalchemy.orm import Session

    from patchdb.store import JudgeConfig, Judgment, Rollout
    from patchdb.store.models import Experiment

    config = tmp_path / "band.toml"
    config.write_text(BAND_SWEEP, encoding="utf-8")
    assert cli("init", "--config", config, "--db", db_path).exit_code == 0
    store = open_store(str(db_path))

    def fill(s: Session) -> None:
        exp = s.query(Experiment).filter_by(name="steered_to_unsteered").one()
        judge = JudgeConfig(model="j", reasoning="medium", template_version="v", backend="openai")
        s.add(judge)
        for layer in (20, 21):
            for word in ("Bread", "Trees"):
                for i in range(10):
                    r = Rollout(experiment_id=exp.id, patch_layer=layer, source_word=word,
                                target_word="", sample_index=i, answer="a")
                    s.add(r)
                    s.flush()
                    detected = True if word == "Bread" else (False if i == 0 else None)
                    for grader, verdict in (("coherence", True), ("detection", detected)):
                        s.add(Judgment(rollout_id=r.id, grader=grader, judge_config_id=judge.id,
                                       verdict=verdict, attempts=1))

    try:
        store.transact(fill)
        with store.read() as session:
            sweep = get_sweep(session, None)
            judge = choose_judge_config(session, sweep, None)
            found = experiment_rates(session, sweep, sweep_config(sweep),
                                     ["steered_to_unsteered"], judge.id)[0]
    finally:
        store.close()
    mean = found.groups[0]
    assert mean.rates == [0.5, 0.5]
    assert mean.successes == [10, 10] and mean.n_scored == [11, 11]  # counted in SQL
    ax = sweep_figure(found, "title", ci=True, ci_method="samples").axes[0]
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    vertices = np.concatenate([p.vertices for p in band.get_paths()])
    at_20 = vertices[np.isclose(vertices[:, 0], 20.0)][:, 1]
    assert (at_20.min(), at_20.max()) == pytest.approx((0.1416, 0.8584), abs=5e-5)
    assert at_20.min() < 0.5 < at_20.max()
