"""`label --plan widest`: the next label goes where the corrected band is widest.

Per detection grader, every (experiment, patch layer) cell gets the width of its widest
corrected line (PPI++, patchdb.report.ppi, with fewer bootstrap draws than the report); a layer
whose correction is n/a for want of labels counts as infinitely wide, one that labels cannot
help (a single word, nothing scored) as narrowest. Within the widest cell the label goes to the
judge's verdict whose stratum adds most to the variance: one without labels first, else the one
with the largest share^2 x q (1 - q) / labels (q its share of true scores, smoothed). Within that
stratum the order is the balanced plan's (the smallest sha256 of the rollout id).
"""

import math
from collections.abc import Callable

from sqlalchemy.orm import Session

from patchdb.choices import LABEL_PLANS
from patchdb.report.corrected import strata_counts
from patchdb.report.ppi import MIN_LABELS, NO, YES, StrataCounts, power_tuning, ppi_lines
from patchdb.store.models import Sweep

PLANS = LABEL_PLANS
DRAWS = 200  # enough to rank cells; the report's bands use 2000
FIXABLE = ("n/a: a verdict stratum has no labeled score", "n/a: labels in too few words",
           f"n/a: under {MIN_LABELS} labels in a verdict stratum")

Cell = tuple[str, int]  # (experiment, patch layer)


def cell_widths(counts: dict[str, StrataCounts]) -> dict[Cell, float]:
    """The widest corrected band of each (experiment, layer) cell."""
    lam = power_tuning(list(counts.values()))
    widths: dict[Cell, float] = {}
    for name, c in counts.items():
        labels = list(c.targets) if c.pairs else [""]
        for line in ppi_lines(c, lam, labels, draws=DRAWS):
            for i, layer in enumerate(c.layers):
                width = float(line.upper[i] - line.lower[i])
                if math.isnan(width):
                    width = math.inf if line.reasons[i] in FIXABLE else -1.0
                widths[(name, layer)] = max(widths.get((name, layer), -math.inf), width)
    return widths


def stratum_need(c: StrataCounts, layer: int) -> dict[bool, float]:
    """Per verdict of the cell, how much its stratum adds to the variance (inf: no labels)."""
    i = c.layers.index(layer)
    total = float(c.n[:, :, i].sum())
    need: dict[bool, float] = {}
    for verdict, h in ((False, NO), (True, YES)):
        n = float(c.n[:, :, i, h].sum())
        labeled = float(c.labeled[:, :, i, h].sum())
        if n == 0:
            continue
        if labeled == 0:
            need[verdict] = math.inf
            continue
        q = (float(c.labeled_true[:, :, i, h].sum()) + 0.5) / (labeled + 1)
        need[verdict] = (n / total) ** 2 * q * (1 - q) / labeled
    return need


def pick_widest(session: Session, sweep: Sweep, grader: str, judge_config_id: int,
                open_: list[tuple[int, str, int, bool | None]],
                order: Callable[[int], str]) -> int | None:
    """The open rollout (id, experiment, layer, verdict) in the widest cell's neediest stratum."""
    counts = strata_counts(session, sweep, grader, judge_config_id)
    widths = cell_widths(counts)
    by_place: dict[tuple[str, int, bool | None], list[int]] = {}
    for rollout, experiment, layer, verdict in open_:
        by_place.setdefault((experiment, layer, verdict), []).append(rollout)
    cells = sorted({(e, layer) for e, layer, _ in by_place},
                   key=lambda cell: (-widths.get(cell, math.inf), cell))
    for experiment, layer in cells:
        c = counts.get(experiment)
        need = stratum_need(c, layer) if c is not None and layer in c.layers else {}
        verdicts = sorted((v for e, lay, v in by_place if (e, lay) == (experiment, layer)),
                          key=lambda v: (-need.get(v, math.inf) if v is not None else 1.0,
                                         str(v)))
        for verdict in verdicts:
            return min(by_place[(experiment, layer, verdict)], key=order)
    return None
