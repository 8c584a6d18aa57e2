"""`patchdb label`: human YES/NO labels, from a local web page or from scripts."""

import json
from typing import TYPE_CHECKING

import click

from patchdb.choices import DEFAULT_LABEL_TARGET, LABEL_PLANS
from patchdb.cli.options import db_option, sweep_option
from patchdb.experiments import GRADERS

if TYPE_CHECKING:  # the store is imported when the command runs: --help stays fast
    from patchdb.label.plan import Progress


@click.command()
@db_option
@sweep_option
@click.option("--grader", "graders", multiple=True, type=click.Choice(GRADERS),
              envvar="PATCHDB_LABEL_GRADER",
              help="Grader to label; repeat for several (default: all three; "
                   "env PATCHDB_LABEL_GRADER).")
@click.option("--labeler", envvar="PATCHDB_LABELER",
              help="Who labels (default: the OS user name; env PATCHDB_LABELER).")
@click.option("--target", type=click.IntRange(min=1), default=DEFAULT_LABEL_TARGET, show_default=True,
              envvar="PATCHDB_LABEL_TARGET", help="Labels wanted per grader (env PATCHDB_LABEL_TARGET).")
@click.option("--judge-config", "judge_config", type=int, envvar="PATCHDB_JUDGE_CONFIG",
              help="Judge config whose YES/NO verdicts the plan balances (default: the one that "
                   "judged the most samples; env PATCHDB_JUDGE_CONFIG).")
@click.option("--plan", type=click.Choice(LABEL_PLANS), default="balanced", show_default=True,
              envvar="PATCHDB_LABEL_PLAN",
              help="What comes next (page and --next): 'balanced' spreads labels over "
                   "experiments and layers and the judge's YES and NO; 'widest' sends the next "
                   "one where the corrected band (report --corrected) is widest (env "
                   "PATCHDB_LABEL_PLAN).")
@click.option("--next", "show_next", is_flag=True, help="Print the next answer to label and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --next: print it as JSON.")
@click.option("--set", "set_rollout", type=int, metavar="ROLLOUT",
              help="Write a label for this rollout id (with one --grader and --yes or --no).")
@click.option("--yes", "yes", is_flag=True, help="With --set: the label is YES.")
@click.option("--no", "no", is_flag=True, help="With --set: the label is NO.")
@click.option("--note", help="A note kept with the label written by --set.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              envvar="PATCHDB_LABEL_PORT", help="Port of the page on 127.0.0.1 (0: a free one).")
def label(db: str, sweep: str | None, graders: tuple[str, ...], labeler: str | None, target: int,
          judge_config: int | None, plan: str, show_next: bool, as_json: bool, set_rollout: int | None,
          yes: bool, no: bool, note: str | None, port: int) -> None:
    """Label answers YES or NO by hand, one grader question at a time, so `patchdb calibrate`
    can measure the judge. Without --next or --set, serve a labeling page on 127.0.0.1 and
    print its URL, which carries the page's secret token: only that URL opens the page (keys:
    y, n, s to skip, u to undo; each tab is its own session). Stop it with Ctrl-C. Every label
    is committed at once. --set writes one label, for a rollout of --sweep.

    \b
    Example:
      patchdb label --db demo.sqlite                     # open the printed URL
      patchdb label --next --grader coherence --json
      patchdb label --set 17 --grader coherence --yes --note "clear and on topic"
    """
    from patchdb.label.labels import default_labeler, set_label
    from patchdb.label.plan import check_graders, plan_next
    from patchdb.store import open_store
    from patchdb.store.sweeps import get_sweep

    who = labeler or default_labeler()
    if yes and no:
        raise click.ClickException("--yes and --no exclude each other; give one")
    if set_rollout is not None:
        if show_next:
            raise click.ClickException("--set and --next exclude each other")
        if len(graders) != 1 or not (yes or no):
            raise click.ClickException("--set needs exactly one --grader and one of --yes/--no")
        store = open_store(db)
        try:
            store.transact(lambda s: set_label(s, set_rollout, graders[0], who, yes, note,
                                               sweep=get_sweep(s, sweep)))
        finally:
            store.close()
        click.echo(f"Labeled rollout {set_rollout} {graders[0]}: {'YES' if yes else 'NO'} "
                   f"(by {who}).")
        return
    if yes or no or note is not None:
        raise click.ClickException("--yes, --no and --note go with --set")
    chosen = check_graders(list(graders))
    if show_next:
        store = open_store(db)
        try:
            with store.read() as session:
                item, progress = plan_next(session, get_sweep(session, sweep), chosen, who,
                                           target, judge_config, plan=plan)
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps({"item": None if item is None else item.to_dict(),
                                   "progress": [vars(p) for p in progress]}, ensure_ascii=False))
        elif item is None:
            click.echo("Nothing left to label: " + _progress_line(progress))
        else:
            click.echo(f"Rollout {item.rollout_id} ({item.experiment}, layer {item.patch_layer}, "
                       f"{item.source} -> {item.target}), grader {item.grader}:")
            click.echo(f"Question: {item.question}\nAnswer: {item.answer}\n")
            click.echo(item.grader_question)
            click.echo("\n" + _progress_line(progress))
        return
    from patchdb.label.server import serve

    serve(db, sweep, chosen, who, target, judge_config, port, announce=click.echo, plan=plan)


def _progress_line(progress: "list[Progress]") -> str:
    return ", ".join(f"{p.grader} {p.labeled}/{p.target}" for p in progress)
