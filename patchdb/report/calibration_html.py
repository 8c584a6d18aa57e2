"""The HTML report's "Judge calibration" section: `patchdb calibrate`'s table, when the sweep
has human labels (no section otherwise)."""

from html import escape

from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.report.calibration import calibrate_judges, describe
from patchdb.store.models import Sweep


def _rate(value: float | None, ci: list[float | None]) -> str:
    if value is None or ci[0] is None or ci[1] is None:
        return "<td></td>"
    return f"<td>{value:.2f} <span class=\"muted\">[{ci[0]:.2f}, {ci[1]:.2f}]</span></td>"


def _num(value: float | None) -> str:
    return "<td></td>" if value is None else f"<td>{value:.2f}</td>"


# Labels first: SQLite keeps a CROSS JOIN's order, and a plain join started from the sweep's
# rollouts (every one of them, 0.03 s at full size) to find that a store has no labels.
HAS_LABELS_SQL = """
SELECT 1 FROM labels l CROSS JOIN rollouts r CROSS JOIN experiments e
WHERE r.id = l.rollout_id AND e.id = r.experiment_id AND e.sweep_id = :sweep
LIMIT 1
"""


def has_labels(session: Session, sweep: Sweep) -> bool:
    """Whether anyone has labeled an answer of the sweep."""
    return session.execute(text(HAS_LABELS_SQL), {"sweep": sweep.id}).first() is not None


def calibration_section(session: Session, sweep: Sweep) -> str:
    """The section's HTML, or "" when no labeled answer has a judgment."""
    if not has_labels(session, sweep):  # spares reading every verdict of a sweep with no labels
        return ""
    rows = calibrate_judges(session, sweep)
    if not rows:
        return ""
    names = {r.judge_config_id: describe(session, r.judge_config_id) for r in rows}
    out = ['<section id="calibration"><h2>Judge calibration</h2>',
           '<p class="note">Each judge config against the human labels of <code>patchdb '
           "label</code> (the labelers' majority; ties left out): true-positive and "
           "true-negative rates with Wilson 95% intervals, accuracy and Cohen's kappa.</p>",
           '<table class="calibration"><thead><tr><th>Judge config</th><th>Grader</th>'
           "<th>n</th><th>TPR</th><th>TNR</th><th>Accuracy</th><th>Kappa</th>"
           "<th>Unparsed</th></tr></thead><tbody>"]
    for row in rows:
        d = row.to_dict()
        out.append(f"<tr><td>{escape(names[row.judge_config_id])}</td>"
                   f"<td>{escape(row.grader)}</td><td>{d['n']}</td>"
                   f"{_rate(d['tpr'], d['tpr_ci'])}{_rate(d['tnr'], d['tnr_ci'])}"
                   f"{_num(d['accuracy'])}{_num(d['kappa'])}<td>{d['unparsed']}</td></tr>")
    out.append("</tbody></table></section>")
    return "\n".join(out)
