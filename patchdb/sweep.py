"""`patchdb sweep`: generate, judge and report in order, each resuming from the store.

With a remote judge, the judge runs beside generate in a second process (`judge --follow`) and
picks up rollouts as they land; with the in-process hf judge the stages run one after the other,
since both would compete for the same cores or GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patchdb.config import SweepConfig
from patchdb.errors import JudgeError
from patchdb.judge.settings import JudgeOptions
from patchdb.judge.stage import JudgeInterrupted, JudgeSummary, run_judge
from patchdb.report import Report, build_report
from patchdb.report.folder_owner import claim_report_folder
from patchdb.store import Store
from patchdb.store.sweeps import register_sweep

if TYPE_CHECKING:  # generate loads torch: imported where it runs, so `sweep --help` is fast
    from patchdb.generate.stage import GenerateResult


@dataclass
class SweepOptions:
    """Narrowing shared by the three stages; None means the whole sweep."""

    experiments: list[str] | None = None
    layers: list[int] | None = None
    words: list[str] | None = None
    samples: int | None = None
    max_new_tokens: int | None = None
    device: str | None = None
    batch_size: int | None = None
    out_dir: Path | None = None
    html: bool = True
    export_json: bool = True
    progress: bool = True
    baselines: bool = True  # also each target condition with no patch (docs/science.md)


@dataclass
class SweepResult:
    generated: GenerateResult | None = None
    judged: JudgeSummary | None = None
    report: Report | None = None
    html_path: Path | None = None


def _judge_options(options: SweepOptions) -> JudgeOptions:
    return JudgeOptions(experiments=options.experiments, layers=options.layers,
                        progress=options.progress)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the sweep during `stage`; what finished is saved and no later stage ran."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


def _start_follower(db_url: str, sweep: str, options: SweepOptions) -> subprocess.Popen[bytes]:
    """The judge beside generate, in a session of its own: a terminal's Ctrl-C reaches only
    this process, which passes one SIGINT on (two would skip the judge's grace period)."""
    args = [sys.executable, "-m", "patchdb", "judge", "--sweep", sweep, "--follow"]
    if options.experiments:
        args += ["--experiments", ",".join(options.experiments)]
    if options.layers:
        args += ["--layers", ",".join(str(x) for x in options.layers)]
    env = dict(os.environ, PATCHDB_DB=db_url)  # not on the command line: a URL may hold a password
    return subprocess.Popen(args, env=env, start_new_session=True)


def _stop_follower(follower: subprocess.Popen[bytes]) -> None:
    """Ask the judge beside generate to stop (it keeps what finished) and wait for it."""
    if follower.poll() is None:
        follower.send_signal(signal.SIGINT)
    follower.wait()


def run_sweep(store: Store, config: SweepConfig, options: SweepOptions) -> SweepResult:
    """Register the sweep, then generate, judge and report whatever is missing. Ctrl-C in a
    stage raises SweepInterrupted after that stage has saved what finished; no later stage runs."""
    from patchdb.generate.stage import GenerateOptions, plan_generate, run_generate

    store.transact(lambda s: register_sweep(s, config))
    result = SweepResult()
    gen_options = GenerateOptions(
        sweep=config.name, experiments=options.experiments, layers=options.layers,
        words=options.words, samples=options.samples, max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size, device=options.device, baselines=options.baselines,
    )
    follower = None
    # a judge beside generate only where generate will write rollouts (a run that only fills
    # in first-token readouts gives it nothing to judge; the judge below runs either way)
    if config.judge.backend != "hf" and plan_generate(store, gen_options).pending:
        follower = _start_follower(store.url, config.name, options)
    try:
        result.generated = run_generate(store, gen_options, progress=options.progress)
    except BaseException:
        if follower is not None:  # the real cause is this error, not the judge's exit code
            _stop_follower(follower)
        raise
    if result.generated.interrupted:
        if follower is not None:
            _stop_follower(follower)
        raise SweepInterrupted("generate")
    if follower is not None:
        code = follower.wait()
        if code != 0:
            raise JudgeError(f"the judge beside generate stopped with exit code {code}; "
                             "rerun `patchdb sweep` to resume")
    # with nothing pending, run_judge loads no model and returns a nothing_pending summary
    try:
        result.judged = run_judge(store, config.name, _judge_options(options))
    except JudgeInterrupted:
        raise SweepInterrupted("judge") from None
    out_dir = claim_report_folder(store, config.name, options.out_dir)  # not another store's
    result.report = build_report(store, config.name, options.experiments, out_dir,
                                 export_json=options.export_json)
    if options.html:
        from patchdb.report.html import write_html_report

        result.html_path = write_html_report(store, config.name, result.report.out_dir,
                                             report=result.report)
    return result
