"""Known values of the rollout seeds and the per-row uniforms, stored here as constants.

The seed constants were computed once with hashlib from the documented recipe (the first 8 bytes,
big-endian, of sha256 over sweep, experiment, layer, source, target and sample joined by the
unit separator U+001F, masked to 62 bits); the test also recomputes them that way. The uniforms
were computed once in plain Python integers. A change to either changes every sampled answer of a
sweep, so a resumed sweep would no longer match its first half.
"""

import hashlib

import pytest
import torch

from patchdb.generate.sampling import rollout_seed, row_uniforms

SEEDS = [
    (("default", "unsteered_to_steered", 40, "", "Bread", 0), 1504551801533698181),
    (("default", "success_to_failure", 60, "Bread", "Dust", 9), 3150112124214606224),
    (("mini", "steered_to_unsteered", 20, "Café", "", 1), 4280851732440756422),
    (("demo", "failure_to_success", 28, "Dust", "Trees", 0), 611274567131576627),
]


def by_recipe(sweep: str, experiment: str, layer: int, source: str, target: str,
              sample: int) -> int:
    text = "\x1f".join([sweep, experiment, str(layer), source, target, str(sample)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) % 2**62


@pytest.mark.parametrize(("identity", "seed"), SEEDS)
def test_rollout_seed_known_values(identity: tuple[str, str, int, str, str, int],
                                   seed: int) -> None:
    assert by_recipe(*identity) == seed
    assert rollout_seed(*identity) == seed


def test_seeds_differ_by_every_part_of_the_identity() -> None:
    base = ("s", "e", 40, "Bread", "", 0)
    changed = [("t", "e", 40, "Bread", "", 0), ("s", "f", 40, "Bread", "", 0),
               ("s", "e", 41, "Bread", "", 0), ("s", "e", 40, "", "Bread", 0),
               ("s", "e", 40, "Bread", "", 1)]
    seeds = {rollout_seed(*base)} | {rollout_seed(*c) for c in changed}  # type: ignore[arg-type]
    assert len(seeds) == 6


def test_row_uniforms_known_values() -> None:
    seeds = torch.tensor([123456789, 2**62 - 1], dtype=torch.int64)
    assert row_uniforms(seeds[:1], 3).tolist() == [(7123001 + 0.5) / 2**24]
    assert row_uniforms(seeds[1:], 17).tolist() == [(4961210 + 0.5) / 2**24]
