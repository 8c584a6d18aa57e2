"""The first-token readout on a tiny random-init Llama: one row per unit whenever generate
prefills it, checked against a readout computed here by a plain forward written out layer by
layer (steering and the MLP patch done by hand, no hooks), and `generate --readout-only`."""

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import file_digest, run_cli
from test_generate_stage import init_store, model_dir, rollouts
from tiny_models import tiny_tokenizer

__all__ = ["model_dir"]  # the tiny model fixture, shared with test_generate_stage

STEER_LAYER, STRENGTH = 1, 4.0
# The first token of each spelling of YES and of NO in the fixture (SmolLM2) tokenizer, read off
# tok.encode by hand: "YES" is "Y" + "ES", so "Y" and " Y" count for YES.
YES_IDS = {73: "Y", 10539: "Yes", 10407: "yes", 718: " Y", 9230: " Yes", 9805: " yes"}
NO_IDS = {13465: "NO", 5230: "No", 4607: "no", 10921: " NO", 2838: " No", 787: " no"}


def readouts(db: Path | str) -> dict[tuple[str, int, str, str, str], tuple[float, float, float, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.question, "
            "r.p_yes, r.p_no, r.entropy, r.top_token "
            "FROM readouts r JOIN experiments e ON e.id = r.experiment_id").fetchall()
    return {tuple(r[:5]): tuple(r[5:]) for r in rows}  # type: ignore[misc]


def _block(block: Any, hidden: torch.Tensor, causal: torch.Tensor, positions: torch.Tensor,
           rotary: Any, mlp_out: dict[str, torch.Tensor] | None, start: int) -> torch.Tensor:
    """One Llama decoder layer written out: attention, then the MLP, whose output at positions
    start.. is recorded into mlp_out["record"] or replaced by mlp_out["replace"]."""
    attn_in = block.input_layernorm(hidden)
    attn, _ = block.self_attn(hidden_states=attn_in, attention_mask=causal,
                              position_ids=positions, position_embeddings=rotary)
    hidden = hidden + attn
    mlp = block.mlp(block.post_attention_layernorm(hidden))
    if mlp_out is not None:
        if "replace" in mlp_out:
            mlp = mlp.clone()
            mlp[0, start:] = mlp_out["replace"]
        else:
            mlp_out["record"] = mlp[0, start:].clone()
    return hidden + mlp


def hand_logits(model: Any, ids: list[int], start: int, vec: torch.Tensor | None,
                patch_layer: int | None = None, mlp_out: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """Last-position logits of a plain forward over `ids`: `vec` added to the output of the
    steer layer from `start` on, and at `patch_layer` the MLP output recorded or replaced."""
    inner = model.model
    x = torch.tensor([ids])
    n = x.shape[1]
    positions = torch.arange(n)[None]
    hidden = inner.embed_tokens(x)
    rotary = inner.rotary_emb(hidden, positions)
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    for i, block in enumerate(inner.layers):
        if i == patch_layer:
            hidden = _block(block, hidden, causal, positions, rotary, mlp_out, start)
        else:
            hidden = _block(block, hidden, causal, positions, rotary, None, start)
        if i == STEER_LAYER and vec is not None:
            hidden = hidden.clone()
            hidden[0, start:] += vec
    return model.lm_head(inner.norm(hidden))[0, -1]


def hand_readout(logits: torch.Tensor) -> tuple[float, float, float, str]:
    p = torch.softmax(logits.double(), dim=-1)
    entropy = float(-(p * torch.log(p)).sum())
    top = tiny_tokenizer().decode([int(p.argmax())])
    return float(p[list(YES_IDS)].sum()), float(p[list(NO_IDS)].sum()), entropy, top


def expected_readouts(db: Path | str, model_dir: Path) -> dict[tuple[str, int, str, str],
                                                                tuple[float, float, float, str]]:
    """Every unit's trial readout of the tiny sweep, worked out here by plain forwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = tiny_tokenizer()
    with sqlite3.connect(db) as conn:
        prompt, start = conn.execute("SELECT prompt_text, injection_start FROM sweeps").fetchone()
        vectors = {w: torch.frombuffer(bytearray(v), dtype=torch.float32) * STRENGTH
                   for w, v in conn.execute("SELECT word, vector FROM concept_vectors "
                                            "WHERE layer = ? AND recipe NOT LIKE 'random%'",
                                            (STEER_LAYER,))}
        units = conn.execute("SELECT DISTINCT e.name, r.patch_layer, r.source_word, "
                             "r.target_word FROM rollouts r JOIN experiments e "
                             "ON e.id = r.experiment_id").fetchall()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = {}
    with torch.inference_mode():
        for exp, layer, source, target in units:
            steer = vectors.get(target)
            if layer == -1:
                logits = hand_logits(model, ids, start, steer)
            else:
                record: dict[str, torch.Tensor] = {}
                hand_logits(model, ids, start, vectors.get(source), layer, record)
                logits = hand_logits(model, ids, start, steer, layer,
                                     {"replace": record["record"]})
            out[(exp, layer, source, target)] = hand_readout(logits)
    return out


def test_the_token_sets_are_the_judge_rules() -> None:
    tok = tiny_tokenizer()
    for ids in (YES_IDS, NO_IDS):
        assert {i: tok.decode([i]) for i in ids} == ids
    from patchdb.generate.readout import FirstTokenReader

    reader = FirstTokenReader(tok)
    assert set(reader.yes_ids) == set(YES_IDS) and set(reader.no_ids) == set(NO_IDS)


def test_generate_writes_one_readout_per_unit_equal_to_a_plain_forward(
        tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)  # greedy, 2 samples, layers 2-3, Bread Trees | Dust
    # one row a batch, so each unit is prefilled twice (its two samples in two batches)
    result = run_cli("generate", "--db", db, "--quiet", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "Wrote 22 readouts" in result.output
    got = readouts(db)
    assert len(got) == 22  # 16 patched units and 6 baselines, one row each, not one per sample
    assert {k[4] for k in got} == {""}
    assert {k[:4] for k in got} == {k[:4] for k in rollouts(db)}
    expected = expected_readouts(db, model_dir)
    assert len({round(v[0], 6) for v in expected.values()}) > 5  # the readouts tell units apart
    for key, (p_yes, p_no, entropy, top) in got.items():
        want = expected[key[:4]]
        assert p_yes == pytest.approx(want[0], abs=1e-6), key
        assert p_no == pytest.approx(want[1], abs=1e-6), key
        assert entropy == pytest.approx(want[2], abs=1e-4), key
        assert top == want[3], key
        assert 0 < p_yes + p_no < 1 and 0 < entropy < 11.0  # ln(49,152) = 10.8

    with sqlite3.connect(db) as conn:
        view = conn.execute("SELECT experiment, patch_layer, source, target, question, p_yes "
                            "FROM readouts_readable WHERE patch_layer = -1 "
                            "AND experiment = 'steered_to_unsteered'").fetchall()
    assert view == [("steered_to_unsteered", -1, "(none)", "(none)", "(trial)",
                     got[("steered_to_unsteered", -1, "", "", "")][0])]


def test_readout_only_prefills_every_unit_and_writes_no_rollouts(tmp_path: Path,
                                                                 model_dir: Path) -> None:
    whole = init_store(tmp_path, model_dir, name="whole.sqlite")
    assert run_cli("generate", "--db", whole, "--quiet").exit_code == 0
    db = init_store(tmp_path, model_dir)
    result = run_cli("generate", "--db", db, "--quiet", "--readout-only")
    assert result.exit_code == 0, result.output
    assert "Wrote 22 readouts (22/22 present)" in result.output
    assert rollouts(db) == {}
    got = readouts(db)
    reference = readouts(whole)
    assert got.keys() == reference.keys()
    for key, values in got.items():
        # the readout pass shares the prompt's prefix cache: equal to float32 rounding
        assert values[:2] == pytest.approx(reference[key][:2], abs=1e-6)
        assert values[2] == pytest.approx(reference[key][2], abs=1e-5)
        assert values[3] == reference[key][3]
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT stage, status, arguments FROM stage_runs").fetchall()
    assert [(stage, status) for stage, status, _ in runs] == [("generate", "finished")]
    assert '"readout_only": true' in runs[0][2]

    assert "First-token readouts: 22/22 present" in run_cli("status", "--db", db).output
    digest = file_digest(Path(db))
    again = run_cli("generate", "--db", db, "--quiet", "--readout-only")
    assert again.exit_code == 0, again.output
    assert "Nothing to read out: all 22 readouts of sweep 'tiny' in scope are present." in again.output
    assert file_digest(Path(db)) == digest

    # merge copies them once, matched by key
    copy = tmp_path / "copy.sqlite"
    merged = run_cli("merge", db, "--db", copy)
    assert merged.exit_code == 0, merged.output
    assert "readouts                22" in merged.output
    assert readouts(copy) == got
    assert "readouts                 0" in run_cli("merge", db, "--db", copy).output

    # the rollouts come later and leave the readouts as they were
    later = run_cli("generate", "--db", db, "--quiet")
    assert later.exit_code == 0, later.output
    assert "Wrote 44 rollouts in 22 units" in later.output
    assert readouts(db) == got


def test_readout_only_narrows_like_generate(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    result = run_cli("generate", "--db", db, "--quiet", "--readout-only", "--layers", "3",
                     "--no-baselines", "--experiments", "failure_to_success")
    assert result.exit_code == 0, result.output
    assert set(readouts(db)) == {("failure_to_success", 3, "Dust", t, "") for t in ("Bread", "Trees")}
    assert "First-token readouts: 2/22 present" in run_cli("status", "--db", db).output
