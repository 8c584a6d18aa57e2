"""The HTML report's "Judge calibration" section: `patchdb calibrate`'s table, when the sweep
has human labels (no section otherwise)."""

from html import escape

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from patchdb.report.calibration import calibrate_judges, describe
from patchdb.store.models import Experiment, Label, Rollout, Sweep


def _rate(value: float | None, ci: list[float | None]) -> str:
    if value is None or ci[0] is None or ci[1] is None:
        return "<td></td>"
    return f"<td>{value:.2f} <span class=\"muted\">[{ci[0]:.2f}, {ci[1]:.2f}]</span></td>"


def _num(value: float | None) -> str:
    return "<td></td>" if value is None else f"<td>{value:.2f}</td>"


def has_labels(session: Session, sweep: Sweep) -> bool:
    """Whether anyone has labeled an answer of the sweep."""
    return bool(session.scalar(select(exists().where(
        Label.rollout_id == Rollout.id, Rollout.experiment_id == Experiment.id,
        Experiment.sweep_id == sweep.id))))


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
