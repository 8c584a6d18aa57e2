"""`report --net --against random_vector`: each experiment's rates net of its random-vector
control instead of the no-injection control's false positives (docs/science.md, Controls).

The random-vector rate of an experiment is the mean over its target words of each word's
random-vector rate (every word has its own random direction, so the rate varies between words
like any word-level rate), banded over those words (Wilson-t, as a line is; one word: Wilson
over its samples). It then stands where the control stands (`ExperimentRates.control`, named
by `reference`), so the net lines, their Newcombe bands, the tables and rates.json subtract it
the way --net subtracts the control. steered_to_unsteered has no target word, hence no random
vector: it keeps the no-injection control.
"""

from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.controls import RANDOM_VECTOR
from patchdb.errors import PatchdbError
from patchdb.experiments import EXPERIMENTS
from patchdb.report.aggregate import ExperimentRates
from patchdb.report.baselines import WordsReference

AGAINST = ("control", RANDOM_VECTOR)
REFERENCE = "random vector"

CONTROL_RATES_SQL = """
SELECT experiment, target_word, n_scored, rate
FROM control_rates
WHERE sweep = :sweep AND judge_config_id = :jc AND control = 'random_vector'
"""


def random_vector_rates(session: Session, sweep: str, judge_config_id: int | None
                        ) -> dict[str, WordsReference]:
    """{experiment: the mean of its target words' random-vector rates} under one config
    (words with nothing scored left out)."""
    words: dict[str, list[tuple[int, int]]] = {}
    if judge_config_id is None:
        return {}
    for experiment, _target, n_scored, rate in session.execute(
            text(CONTROL_RATES_SQL), {"sweep": sweep, "jc": judge_config_id}):
        successes = round(float(rate) * int(n_scored)) if rate is not None else 0
        words.setdefault(experiment, [])
        if int(n_scored):
            words[experiment].append((int(n_scored), successes))
    return {e: WordsReference(e, "", sum(n for n, _ in w), sum(n for n, _ in w),
                              sum(k for _, k in w), tuple(k / n for n, k in w),
                              tuple(n for n, _ in w))
            for e, w in words.items()}


def net_against_random_vector(session: Session, sweep: str, config: SweepConfig,
                              judge_config_id: int | None, rates: list[ExperimentRates]) -> None:
    """Put each experiment's random-vector rate where --net reads the control; refuse,
    in one line, a sweep without the control or an experiment with none of it scored."""
    if RANDOM_VECTOR not in config.controls:
        raise PatchdbError(f"--against random_vector needs the random-vector control, which "
                           f"sweep {sweep!r} does not have; register a sweep with "
                           "controls = [\"random_vector\"] in [sweep]")
    found = random_vector_rates(session, sweep, judge_config_id)
    for r in rates:
        if EXPERIMENTS[r.name].target == "none":
            continue  # no target word, no random vector: the no-injection control stays
        reference = found.get(r.name)
        if reference is None or not reference.n_scored:
            raise PatchdbError(
                f"--net --against random_vector needs {r.name}'s random-vector rate, and none "
                "of its random-vector rollouts is scored under this judge config; run "
                "`patchdb generate` and `patchdb judge` for them")
        r.control, r.reference = reference, REFERENCE
