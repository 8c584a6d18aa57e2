"""Draw docs/corrected_plot.png: `patchdb report --corrected` on a synthetic, labeled sweep.

    python scripts/draw_corrected_example.py              # writes docs/corrected_plot.png
    python scripts/draw_corrected_example.py --out x.png  # somewhere else

The sweep is failure_to_success alone, patch layers 19-29, target words Bread, Trees and Oceans
(each steered from the default sweep's 10 negative words), 8 samples a key: 240 rollouts a layer,
2,640 in all.
The truth is known: a rollout is coherent with probability 0.9 and scores (coherent AND names its
word) with probability peak(L) x the word's factor, where peak(L) = 0.05 + 0.45 exp(-((L - 23) /
2)^2) is 0.5 at layer 23 and the factors (1.15, 1.0, 0.85) average 1. A made-up judge grades
coherence with TPR 0.95, TNR 0.7 and detection+identification with TPR 0.85, TNR 0.8 (20% false
positives), at every layer. Labels follow the label plan's strata: in each layer, 10 rollouts the
judge said YES to (detection) and 10 it said NO to, drawn uniformly, each labeled for both graders
with its true verdicts: 220 labeled rollouts, 440 labels. The store lives in a temporary folder;
the report runs with the default correction (PPI++) and its plot is copied to --out, made a
palette PNG to keep it small. Everything is seeded: the same run draws the same picture.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import insert, select

from patchdb.config import SweepConfig
from patchdb.label.labels import set_label
from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.sweeps import get_experiments, register_sweep

LAYERS = list(range(19, 30))
POSITIVE = ["Bread", "Trees", "Oceans"]
NEGATIVE = ["Constellations", "Contraptions", "Dust", "Fountains", "Milk", "Mirrors",
            "Monoliths", "Plastic", "Rubber", "Trumpets"]
WORD_FACTOR = {"Bread": 1.15, "Trees": 1.0, "Oceans": 0.85}
SAMPLES = 8
COHERENT_P = 0.9
COHERENCE_TPR, COHERENCE_TNR = 0.95, 0.7
DETECTION_TPR, DETECTION_TNR = 0.85, 0.8
LABELS_PER_STRATUM = 10
LABELER = "synthetic"
ROOT = Path(__file__).resolve().parent.parent


def peak(layer: int) -> float:
    """The mean true score rate over words at a layer: 0.5 at layer 23, 0.05 far from it."""
    return 0.05 + 0.45 * float(np.exp(-(((layer - 23) / 2) ** 2)))


def judged(rng: np.random.Generator, truth: bool, tpr: float, tnr: float) -> bool:
    """The made-up judge's verdict on one answer whose true verdict is `truth`."""
    return bool(rng.random() < tpr) if truth else bool(rng.random() >= tnr)


def build_store(db: str, seed: int) -> None:
    """The sweep, its rollouts and judgments (one judge config), and the plan's labels."""
    rng = np.random.default_rng(seed)
    config = SweepConfig(name="synthetic", model="synthetic", steer_layer=17, patch_layers="19-29",
                         samples=SAMPLES, positive_words=POSITIVE, negative_words=NEGATIVE,
                         experiments=["failure_to_success"])
    store = open_store(db, create=True)
    truths: dict[int, tuple[bool, bool]] = {}  # rollout id -> (coherent, detected+identified)
    detected_by_judge: dict[int, bool] = {}

    def fill(session: Any) -> None:
        sweep, _ = register_sweep(session, config)
        (exp,) = get_experiments(session, sweep)
        judge = JudgeConfig(model="synthetic-judge", reasoning="none",
                            template_version="synthetic", backend="openai")
        session.add(judge)
        session.flush()
        rollouts: list[dict[str, Any]] = []
        judgments: list[dict[str, Any]] = []
        for layer in LAYERS:
            for source in NEGATIVE:
                for target in POSITIVE:
                    score_p = peak(layer) * WORD_FACTOR[target]
                    for sample in range(SAMPLES):
                        rid = len(rollouts) + 1
                        coherent = bool(rng.random() < COHERENT_P)
                        # P(detected | coherent) = score_p / COHERENT_P makes P(score) = score_p
                        detected = bool(rng.random() < score_p / COHERENT_P)
                        truths[rid] = (coherent, coherent and detected)
                        rollouts.append(dict(
                            id=rid, experiment_id=exp.id, patch_layer=layer, source_word=source,
                            target_word=target, sample_index=sample, n_tokens=20,
                            answer=f"A synthetic answer ({source} to {target}, layer {layer}).",
                            finish_reason="stop", seed=sample))
                        verdicts = {
                            "coherence": judged(rng, coherent, COHERENCE_TPR, COHERENCE_TNR),
                            "detection_identification": judged(
                                rng, detected, DETECTION_TPR, DETECTION_TNR)}
                        detected_by_judge[rid] = verdicts["detection_identification"]
                        for grader, verdict in verdicts.items():
                            judgments.append(dict(
                                rollout_id=rid, grader=grader, judge_config_id=judge.id,
                                verdict=verdict, raw_reply="YES" if verdict else "NO"))
        session.execute(insert(Rollout), rollouts)
        session.execute(insert(Judgment), judgments)

    def label(session: Any) -> None:
        for layer in LAYERS:
            ids = list(session.scalars(select(Rollout.id).where(Rollout.patch_layer == layer)
                                       .order_by(Rollout.id)))
            for verdict in (True, False):
                stratum = [rid for rid in ids if detected_by_judge[rid] == verdict]
                picked = rng.choice(stratum, min(LABELS_PER_STRATUM, len(stratum)), replace=False)
                for rid in sorted(int(r) for r in picked):
                    coherent, score = truths[rid]
                    set_label(session, rid, "coherence", LABELER, coherent)
                    set_label(session, rid, "detection_identification", LABELER, score)

    try:
        store.transact(fill)
        store.transact(label)
    finally:
        store.close()


def to_palette(png: Path, out: Path) -> int:
    """Save a 256-colour palette copy of the plot (about a third of matplotlib's RGBA file);
    returns the largest change of any pixel's channel (0-255), to show the colours held."""
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    palette = rgb.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    palette.save(out, optimize=True)
    diff = np.abs(np.asarray(palette.convert("RGB"), dtype=int) - np.asarray(rgb, dtype=int))
    return int(diff.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "corrected_plot.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "synthetic.sqlite")
        build_store(db, args.seed)
        print("true mean score rate by layer: " + "; ".join(
            f"{layer}: {100 * peak(layer):.0f}" for layer in LAYERS))
        report = Path(tmp) / "report"
        subprocess.run([sys.executable, "-m", "patchdb", "report", "--db", db, "--out",
                        str(report), "--corrected"], check=True)
        plot = report / "failure_to_success" / "sweep_plot_corrected.png"
        error = to_palette(plot, args.out)
        print(f"{args.out}: {args.out.stat().st_size} bytes (matplotlib's file: "
              f"{plot.stat().st_size} bytes; palette colours off by at most {error} of 255)")


if __name__ == "__main__":
    main()
