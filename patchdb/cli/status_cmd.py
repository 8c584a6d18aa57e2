"""`patchdb status`: what is expected, what is present, what is running."""

import json
from typing import TYPE_CHECKING

import click

from patchdb.cli.options import db_option, judge_config_option, sweep_option
from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.experiments import BASELINE_LAYER

if TYPE_CHECKING:  # the store is imported when the command runs: --help stays fast
    from patchdb.store.status import SweepStatus

# the rows of units with no patch: the baselines and the random-vector control
UNPATCHED_LABELS: dict[int, str] = {BASELINE_LAYER: "base", RANDOM_VECTOR_LAYER: "rand"}


def sampling_line(status: "SweepStatus") -> str:
    """How the sweep's tokens are drawn, as recorded by its first generate run."""
    if status.temperature == 0:
        return "greedy (temperature 0)"
    if status.top_k is None or status.top_p is None:
        return (f"temperature {status.temperature:g}; top_k and top_p not resolved yet "
                "(generate records them)")
    return f"temperature {status.temperature:g}, top_k {status.top_k}, top_p {status.top_p:g}"


def render(status: "SweepStatus") -> str:
    prompt = (f"sha256 {status.prompt_hash}" if status.prompt_hash
              else "not rendered yet (generate stores it)")
    lines = [f"Sweep {status.sweep} (model {status.model})", f"Prompt: {prompt}",
             f"Sampling: {sampling_line(status)}", ""]
    header = (f"{'experiment':<22} {'layer':>5} {'rollouts':>15} {'judged':>15} "
              f"{'unparsed':>8} {'cut off':>7} {'errors':>6}")
    lines.append(header)
    lines.append("-" * len(header))
    for row in status.layers:
        rollouts = f"{row.rollouts_present}/{row.rollouts_expected}"
        judged = f"{row.judged}/{row.judgments_expected}"
        layer = UNPATCHED_LABELS.get(row.patch_layer, row.patch_layer)  # no patch
        lines.append(f"{row.experiment:<22} {layer:>5} {rollouts:>15} {judged:>15} "
                     f"{row.unparsed:>8} {row.cut_off:>7} {row.errors:>6}")
    t = status.totals()
    lines.append("-" * len(header))
    lines.append(f"{'total':<22} {'':>5} {t['rollouts_present']}/{t['rollouts_expected']:<8} "
                 f"{t['judged']:>7}/{t['judgments_expected']:<7} {t['unparsed']:>8} "
                 f"{t['cut_off']:>7} {t['errors']:>6}")
    lines.append("")
    lines.append(f"First-token readouts: {status.readouts_present}/{status.readouts_expected} "
                 "present (`patchdb generate --readout-only` fills them)")
    lines.append(f"Judgments counted: {status.judge_choice}")
    lines.append(f"Judge cost so far: ${status.judge_cost:.4f} "
                 f"({status.judge_configs} judge config(s))")
    if status.batches_live or status.batches_collected:
        lines.append(f"Judge batches: {status.batches_live} live "
                     f"({status.batch_requests_live:,} requests; `patchdb judge --batch "
                     f"--collect` shows and collects them), {status.batches_collected} collected")
    if status.stages:
        lines.append("")
        lines.append("Recent stages:")
        for s in status.stages:
            extra = f"  error: {s.error.splitlines()[0]}" if s.error else ""
            lines.append(f"  #{s.id} {s.stage:<9} {s.status:<11} {s.host}:{s.pid} "
                         f"started {s.started_at[:19]}Z{extra}")
    return "\n".join(lines)


@click.command()
@db_option
@sweep_option
@judge_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(db: str, sweep: str | None, judge_config: int | None, as_json: bool) -> None:
    """Show expected vs present rollouts and judgments per experiment and layer,
    the judge cost so far, and which stages are running or crashed.

    \b
    Example:
      patchdb status --db runs.sqlite
      patchdb status --json | jq .totals
    """
    from patchdb.store import open_store
    from patchdb.store.status import sweep_status

    store = open_store(db)
    try:
        result = sweep_status(store, sweep, judge_config)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(render(result))
