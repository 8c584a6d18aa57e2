"""The readouts' section of the HTML page: per experiment, the readout plot (P(yes) by patch
layer, and the yes-bias index where the unrelated questions were asked) and its table."""

from html import escape

from patchdb.report.html_assets import png_data_uri
from patchdb.report.readout_plot import readout_figure
from patchdb.report.readouts import ExperimentReadouts, readout_table


def readout_section(readouts: list[ExperimentReadouts], title: str) -> str:
    """The section, or "" when no experiment has a readout; `title` has a {} for the name."""
    shown = [er for er in readouts if not er.empty]
    if not shown:
        return ""
    out = ['<section id="readouts"><h2>First-token readout</h2>',
           '<p class="note">P(yes) and P(no) of the first answer token after each unit\'s '
           "prefill, from the model's own distribution: no sampling, no judge "
           "(docs/science.md).</p>"]
    for er in shown:
        png = png_data_uri(readout_figure(er, title.format(er.name)))
        out.append(f'<div class="result"><figure><img alt="first-token P(yes) against patch '
                   f'layer, {escape(er.name)}" src="{png}"></figure>'
                   f'<div class="table-wrap"><pre>{escape(readout_table(er))}</pre></div></div>')
    out.append("</section>")
    return "".join(out)
