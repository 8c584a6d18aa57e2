"""`patchdb calibrate`: each judge config's verdicts against the human labels."""

import json
import math

import click

from patchdb.cli.options import db_option, sweep_option
from patchdb.errors import CalibrationError


def _rate(value: float | None, ci: list[float | None]) -> str:
    if value is None or ci[0] is None or ci[1] is None:
        return f"{'-':>21}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


@click.command()
@db_option
@sweep_option
@click.option("--judge-config", "judge_config", type=int, envvar="PATCHDB_JUDGE_CONFIG",
              help="Only this judge config (default: every config that judged a labeled "
                   "answer; env PATCHDB_JUDGE_CONFIG).")
@click.option("--against", type=int, envvar="PATCHDB_CALIBRATE_AGAINST",
              help="Also show how often this judge config agrees with --judge-config on the "
                   "answers both judged (env PATCHDB_CALIBRATE_AGAINST).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def calibrate(db: str, sweep: str | None, judge_config: int | None, against: int | None,
              as_json: bool) -> None:
    """Measure each judge config against the human labels of `patchdb label`: per grader, the
    number of labeled answers, the true-positive and true-negative rates with Wilson 95%
    intervals, accuracy and Cohen's kappa. Where several people labeled one answer, their
    majority is the truth (ties are left out); unparsed verdicts are counted apart.

    \b
    Example:
      patchdb calibrate --db demo.sqlite
      patchdb calibrate --judge-config 1 --against 2 --json
    """
    if against is not None and judge_config is None:
        raise click.UsageError("--against needs --judge-config (the first of the two)")
    from patchdb.report.calibration import agreement, calibrate_judges, describe  # --help: fast
    from patchdb.store import open_store
    from patchdb.store.sweeps import get_sweep

    store = open_store(db)
    try:
        with store.read() as session:
            the_sweep = get_sweep(session, sweep)
            rows = calibrate_judges(session, the_sweep, judge_config)
            names = {r.judge_config_id: describe(session, r.judge_config_id) for r in rows}
            agreed = agreement(session, the_sweep, judge_config, against) \
                if against is not None and judge_config is not None else None
    finally:
        store.close()
    if not rows and agreed is None:
        raise CalibrationError(f"no labeled answer of sweep {the_sweep.name!r} has a judgment "
                               "yet; label some with `patchdb label`")
    if as_json:
        out: dict[str, object] = {"sweep": the_sweep.name,
                                  "calibration": [r.to_dict() for r in rows]}
        if agreed is not None:
            out["agreement"] = {"first": judge_config, "second": against,
                                "graders": [a.to_dict() for a in agreed]}
        click.echo(json.dumps(out, indent=2))
        return
    current = None
    for row in rows:
        if row.judge_config_id != current:
            current = row.judge_config_id
            click.echo(f"{names[current]}:")
            click.echo(f"  {'grader':<25} {'n':>4}  {'TPR [95% CI]':<21}  {'TNR [95% CI]':<21}"
                       f"  {'accuracy':>8}  {'kappa':>6}  unparsed")
        d = row.to_dict()
        click.echo(f"  {row.grader:<25} {d['n']:>4}  {_rate(d['tpr'], d['tpr_ci']):<21}  "
                   f"{_rate(d['tnr'], d['tnr_ci']):<21}  {_num(d['accuracy']):>8}  "
                   f"{_num(d['kappa']):>6}  {d['unparsed']}")
    if agreed is not None:
        click.echo(f"Agreement of judge configs {judge_config} and {against} "
                   "(answers both judged):")
        for a in agreed:
            d = a.to_dict()
            click.echo(f"  {a.grader:<25} n {d['n']:>5}  agreement {_num(d['agreement'])}  "
                       f"kappa {_num(d['kappa'])}")
