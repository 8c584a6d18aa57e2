"""save_figure's PNG: the report writes its plots itself (three channels where every pixel is
opaque, a quicker zlib level) and must give the very pixels, size and text of matplotlib's own
savefig at the same dpi, which is the reference here."""

from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from patchdb.report.plots import SAVE_DPI, save_figure


def drawing(facecolor: str) -> Figure:
    """Faint crossing lines, a band, a legend and text: many blended colours, as a sweep plot."""
    fig = Figure(figsize=(6, 4), facecolor=facecolor)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(20)
    for i in range(12):
        ax.plot(x, np.sin(x / 3 + i) * (i + 1), alpha=0.2 + 0.05 * i, label=f"line {i}")
    ax.fill_between(x, -3, 3, alpha=0.2)
    ax.set_title("Coherent & Detect Rate, 95% band")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return fig


@pytest.mark.parametrize("facecolor", ["white", "none"])
def test_the_png_has_savefigs_pixels(tmp_path: Path, facecolor: str) -> None:
    fig = drawing(facecolor)
    fig.savefig(tmp_path / "reference.png", format="png", dpi=SAVE_DPI)
    dpi = fig.dpi
    path = save_figure(fig, tmp_path / "sub" / "plot.png")
    assert fig.dpi == dpi  # the figure is left as it was
    with Image.open(tmp_path / "reference.png") as ref, Image.open(path) as ours:
        assert ours.size == ref.size == (6 * SAVE_DPI, 4 * SAVE_DPI)
        assert ours.info["Software"] == ref.info["Software"]
        assert ours.info["dpi"] == pytest.approx(ref.info["dpi"])
        # an opaque figure loses only its alpha channel, a transparent one keeps it
        assert ours.mode == ("RGB" if facecolor == "white" else "RGBA")
        expected = np.asarray(ref.convert("RGBA"))
        assert len({tuple(p) for p in expected.reshape(-1, 4)[::7]}) > 50  # blended colours
        assert np.array_equal(np.asarray(ours.convert("RGBA")), expected)


def test_other_formats_still_go_through_savefig(tmp_path: Path) -> None:
    path = save_figure(drawing("white"), tmp_path / "plot.svg")
    assert path.read_text(encoding="utf-8").lstrip().startswith("<?xml")
