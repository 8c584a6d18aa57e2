"""The `judge --dry-run` table, shared by the live and the batch judge commands."""

from patchdb.judge.plan import DryRun

MODE_FLAGS = {"only_missing": "--only-missing", "retry_unparsed": "--retry-unparsed",
              "retry_errors": "--retry-errors", "overwrite": "--overwrite"}


def render_plan(dry: DryRun, mode: str, limit: int | None = None) -> str:
    """The dry-run table, then what the command would send now and what it would cost."""
    header = (f"{'experiment':<22} {'keys':>5} {'samples':>7} {'layers':>6} {'graders':>7} "
              f"{'calls':>9} {'judged':>9} {'send now':>9} {'awaiting generate':>17}")
    lines = [header, "-" * len(header)]
    for r in dry.rows:
        lines.append(f"{r.experiment:<22} {r.keys:>5} {r.samples:>7} {r.layers:>6} "
                     f"{r.graders:>7} {r.calls:>9,} {r.done:>9,} {r.send_now:>9,} "
                     f"{r.awaiting_generate:>17,}")
    rows = dry.rows
    calls, done = sum(r.calls for r in rows), sum(r.done for r in rows)
    send, awaiting = sum(r.send_now for r in rows), sum(r.awaiting_generate for r in rows)
    lines.append("-" * len(header))
    lines.append(f"{'total':<22} {'':>5} {'':>7} {'':>6} {'':>7} {calls:>9,} {done:>9,} "
                 f"{send:>9,} {awaiting:>17,}")
    config = (f"judge config #{dry.config_id}" if dry.config_id is not None
              else "a new judge config (these settings have judged nothing yet)")
    capped = f" (--limit {limit:,} of {send:,})" if limit is not None and limit < send else ""
    lines.append(f"{MODE_FLAGS.get(mode, mode)} would send {dry.send_now:,} calls now{capped}, "
                 f"as {config}; {awaiting:,} more calls wait for rollouts generate has not "
                 "written yet.")
    cost, later = dry.cost, dry.cost_awaiting
    if cost.usd is None:
        lines.append(f"Estimated cost: unknown: {cost.basis}.")
    else:
        lines.append(f"Estimated cost: ${cost.usd:,.4f} ({cost.basis}).")
        if awaiting and later.usd is not None:
            lines.append(f"The calls that wait for generate: about ${later.usd:,.4f} more.")
        elif awaiting:
            lines.append(f"The calls that wait for generate: cost unknown: {later.basis}.")
    return "\n".join(([dry.judge] if dry.judge else []) + lines)
