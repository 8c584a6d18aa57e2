"""The controls' model-side parts: norm-matched random vectors, the unrelated questions' prompts,
and which vector steers a unit (patchdb.controls says what each control is).

A random vector for word w at layer L is a direction drawn from a standard normal with a seed
fixed by (L, w) (random_vector_seed), scaled to the norm of w's concept vector at L. It is stored
in concept_vectors under RANDOM_RECIPE with that norm, so every later run injects the same one.
"""

import hashlib

import torch

from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.experiments import NO_STEERING
from patchdb.generate.prompt import TRIAL_MARKER, RenderedPrompt, render_prompt
from patchdb.generate.vectors import insert_missing, stored_vectors
from patchdb.store import Store
from patchdb.store.sweeps import ExpectedUnit

RANDOM_RECIPE = "random-direction-at-concept-norm/v1"


def random_vector_seed(layer: int, word: str) -> int:
    """62 bits of sha256 over "random_vector/<layer>/<word>": the same direction on every
    machine and in every sweep that steers at this layer."""
    digest = hashlib.sha256(f"random_vector/{layer}/{word}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def random_vector(layer: int, word: str, concept: torch.Tensor) -> torch.Tensor:
    """A seeded random direction with the norm of `concept` (float32, on the CPU)."""
    generator = torch.Generator().manual_seed(random_vector_seed(layer, word))
    direction = torch.randn(concept.numel(), generator=generator, dtype=torch.float32)
    return direction / direction.norm() * concept.detach().float().norm()


def ensure_random_vectors(
    store: Store, model_id: str, layer: int, concepts: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The random vector of each word (raw, float32, CPU), made from its concept vector and
    stored the first time; a stored one is reused."""
    with store.read() as session:
        held = stored_vectors(session, model_id, layer, list(concepts), (RANDOM_RECIPE,))
    missing = {w: random_vector(layer, w, v) for w, v in concepts.items() if w not in held}
    if missing:
        held.update(store.transact(
            lambda s: insert_missing(s, model_id, layer, RANDOM_RECIPE, missing)))
    return {w: held[w] for w in concepts}


def question_trial(trial: str, question: str) -> str:
    """The sweep's trial turn with `question` in place of its question: the text up to
    "Trial 1" is kept, so the blank line (the injection start) is where it was."""
    marker = trial.find(TRIAL_MARKER)
    if marker >= 0:
        return f"{trial[:marker]}{TRIAL_MARKER}: {question}"
    blank = trial.rfind("\n\n")
    return trial[: blank + 2] + question


def question_prompt(tokenizer: object, intro: str, trial: str, question: str) -> RenderedPrompt:
    """The experiment prompt asking `question` in place of the trial question."""
    return render_prompt(tokenizer, intro, question_trial(trial, question))


def unit_steer(
    unit: ExpectedUnit, scaled: dict[str, torch.Tensor], random_scaled: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """The (strength-scaled) vector a unit's target run is steered with: the target word's, its
    random vector in the random-vector control, or None for no steering."""
    if unit.target_word == NO_STEERING:
        return None
    if unit.patch_layer == RANDOM_VECTOR_LAYER:
        return random_scaled[unit.target_word]
    return scaled[unit.target_word]
