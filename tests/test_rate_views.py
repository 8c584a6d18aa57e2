"""The rate views count one judge config at a time: a coherence verdict is paired with the
detection verdict of the same judge config, never another's, on SQLite and PostgreSQL.

The store: steered_to_unsteered (Bread, Trees; patch layers 2 and 3; 2 samples) with one
baseline of its target condition (the control, 2 samples), judged by two judge configs:
  A: coherent YES everywhere; detected YES for sample 0, NO for sample 1 -> every rate 1/2
  B: coherent YES everywhere; detected NO everywhere                       -> every rate 0
Paired with the other config's verdicts, A's rates would be 1/4 and B's 1/4, and n would
double; the expected values below are these hand counts.
"""

from judge_server import make_store
from pg import query
from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.experiments import BASELINE_LAYER, NO_STEERING
from patchdb.store import Experiment, JudgeConfig, Judgment, Rollout, open_store


def judged_store(db: str) -> dict[str, int]:
    """Fill `db` as the module docstring says; returns the judge config ids by name."""
    make_store(db, experiments=["steered_to_unsteered"])
    store = open_store(db)
    try:
        def fill(session: Session) -> dict[str, int]:
            exp = session.scalars(select(Experiment)).one()
            for sample in (0, 1):
                session.add(Rollout(experiment_id=exp.id, patch_layer=BASELINE_LAYER,
                                    source_word=NO_STEERING, target_word=NO_STEERING,
                                    sample_index=sample, answer="nothing", n_tokens=1,
                                    finish_reason="stop", seed=sample))
            configs = {name: JudgeConfig(model=f"judge-{name}", reasoning="low",
                                         template_version="v", backend="openai")
                       for name in ("A", "B")}
            session.add_all(configs.values())
            session.flush()
            for rollout in session.scalars(select(Rollout)):
                for name, config in configs.items():
                    detected = name == "A" and rollout.sample_index == 0
                    session.add(Judgment(rollout_id=rollout.id, grader="coherence",
                                         judge_config_id=config.id, verdict=True))
                    session.add(Judgment(rollout_id=rollout.id, grader="detection",
                                         judge_config_id=config.id, verdict=detected))
            return {name: config.id for name, config in configs.items()}
        return store.transact(fill)
    finally:
        store.close()


def test_layer_rates_pair_verdicts_of_one_judge_config(store_db: str) -> None:
    ids = judged_store(store_db)
    name = {v: k for k, v in ids.items()}
    rows = query(store_db, "SELECT judge_config_id, patch_layer, source, n, n_scored, rate "
                           "FROM layer_rates ORDER BY judge_config_id, patch_layer, source")
    got = [(name[c], layer, source, n, scored, float(rate)) for c, layer, source, n, scored, rate
           in rows]
    assert got == [
        ("A", 2, "Bread", 2, 2, 0.5), ("A", 2, "Trees", 2, 2, 0.5),
        ("A", 3, "Bread", 2, 2, 0.5), ("A", 3, "Trees", 2, 2, 0.5),
        ("B", 2, "Bread", 2, 2, 0.0), ("B", 2, "Trees", 2, 2, 0.0),
        ("B", 3, "Bread", 2, 2, 0.0), ("B", 3, "Trees", 2, 2, 0.0),
    ]


def test_baseline_rates_pair_verdicts_of_one_judge_config(store_db: str) -> None:
    ids = judged_store(store_db)
    rows = query(store_db, "SELECT judge_config_id, target, n, n_scored, rate "
                           "FROM baseline_rates ORDER BY judge_config_id")
    assert [(c, target, n, scored, float(rate)) for c, target, n, scored, rate in rows] == [
        (ids["A"], "(none)", 2, 2, 0.5), (ids["B"], "(none)", 2, 2, 0.0)]


def test_sample_scores_pair_verdicts_of_one_judge_config(store_db: str) -> None:
    ids = judged_store(store_db)
    rows = query(store_db, "SELECT judge_config_id, sample_index, count(*), sum(score) "
                           "FROM sample_scores GROUP BY judge_config_id, sample_index "
                           "ORDER BY judge_config_id, sample_index")
    # 5 rollouts per sample index (4 patched keys and the baseline), one row each per config
    assert [tuple(int(v) for v in row) for row in rows] == [
        (ids["A"], 0, 5, 5), (ids["A"], 1, 5, 0), (ids["B"], 0, 5, 0), (ids["B"], 1, 5, 0)]
