"""A small judged sweep for the label, calibrate and corrected-rate tests: 48 rollouts (12 keys
x layers 3-4 x 2 samples) judged by one made-up judge config whose verdicts follow `judge_says`."""

from conftest import run_cli
from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.experiments import EXPERIMENTS, experiment_keys
from patchdb.store import Experiment, JudgeConfig, Judgment, Rollout

CONFIG = """
[sweep]
name = "tiny"
model = "HuggingFaceTB/SmolLM2-135M-Instruct"
dtype = "float32"
steer_layer = 1
patch_layers = "3-4"
samples = 2
positive_words = ["Bread", "Trees"]
negative_words = ["Dust", "Milk"]
"""


def judge_says(layer: int, sample: int, grader: str) -> bool:
    """The made-up judge: YES on sample 0, NO on sample 1, for every grader and layer."""
    return sample == 0


def init_store(db: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    result = run_cli("init", "--config", str(config), "--db", db)
    assert result.exit_code == 0, result.output


def fill(session: Session) -> None:
    """The 48 rollouts, each judged by config "judge-a" for coherence and its detection grader."""
    judge = JudgeConfig(model="judge-a", reasoning="low", template_version="v1", backend="openai")
    session.add(judge)
    session.flush()
    for exp in session.scalars(select(Experiment).order_by(Experiment.id)):
        d = EXPERIMENTS[exp.name]
        for layer in (3, 4):
            for source, target in experiment_keys(d, ["Bread", "Trees"], ["Dust", "Milk"]):
                for sample in (0, 1):
                    rollout = Rollout(experiment_id=exp.id, patch_layer=layer,
                                      source_word=source, target_word=target,
                                      sample_index=sample, answer=f"answer {layer} {sample}",
                                      n_tokens=3, finish_reason="stop", seed=sample)
                    session.add(rollout)
                    session.flush()
                    for grader in ("coherence", d.detection_grader):
                        verdict = judge_says(layer, sample, grader)
                        session.add(Judgment(rollout_id=rollout.id, grader=grader,
                                             judge_config_id=judge.id, verdict=verdict,
                                             raw_reply=f"thinking... {'YES' if verdict else 'NO'}"))
