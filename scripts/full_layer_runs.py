"""The full-layer bench's run kinds and its summary (bench_generate.py --full-layer): what each
kind changes for its run, `--runs` parsing, how alike a run's answers are, the rollouts that
differ between runs, and the projections of the full default sweep printed at the end."""

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import torch
from pick_changes import parse_prefix, parse_shape

from patchdb.generate import refill, sampling, triton_decode

FULL_SWEEP_ROLLOUTS = 236_544  # the default sweep: 21 patch layers x 176 units x 64 samples


FULL_LAYER_RUNS = {  # name: (compile: None for the stage's choice, early stop, shrink rows,
    #                         continuous batching)
    "defaults": (None, False, True, True),
    "compile-off": (False, False, True, True),
    "compile-on": (True, False, True, True),
    "fixed": (None, False, True, False),
    "stop-refill": (True, True, True, True),
    "stop-shrink": (True, True, True, False),
    "stop-keep": (True, True, False, False),
    "stop-paged": (True, True, True, True),  # KV by need, sized from the stop lengths
    # defaults with each layer's new keys and values scattered into the cache by two kernels,
    # as before the decode kernel stored them itself (kv_writes.py): the A/B of that change
    "defaults-scatter": (None, False, True, True),
    # stop-refill refilling once 1/16 of the rows are idle, as before REFILL_FRACTION was 1/64
    "stop-refill-16": (True, True, True, True),
    # defaults and stop-refill with answers whose rows differ (diverse_answers)
    "defaults-diverse": (None, False, True, True),
    "stop-refill-diverse": (True, True, True, True),
}

# A random-init Gemma-3-27B shape feeds every row the same token: the tied embedding dominates
# the last hidden state, so the token just fed takes 99% of the top-64 mass and top-p keeps it
# alone (at full width and depth on a CPU: every answer repeats the prompt's last token). The 64
# rows of a unit are then identical at every step of a uniform run, and a power-capped card
# clocks higher on such data than on a real model's. Halving the embedding (exact in bf16, and
# undone exactly) flattens the draw: answers of different tokens, rows that differ.
DIVERSE_EMBED_SCALE = 0.5


@contextmanager
def diverse_answers(model: Any) -> Iterator[None]:
    """The model's (tied) embedding scaled by DIVERSE_EMBED_SCALE for the block, then restored."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight.mul_(DIVERSE_EMBED_SCALE)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.div_(DIVERSE_EMBED_SCALE)


# `+name=value` changes whose value (as `changes` reads it) replaces one module setting
SETTINGS = {"attn": (triton_decode, "DEFAULT"), "topk": (sampling, "TOPK_SLICES"),
            "prefix": (triton_decode, "PREFIX")}
# `+name=value` changes that switch one setting for an A/B in one process: the draw's slices by
# the Triton kernels, not PyTorch (sampling.SLICE_KERNELS, off by default until measured); the
# prefill queue topped up all at once below a row's worth, as before, not one call a step
# (refill.py).
SWITCHES = {
    "draw": {"triton": [(sampling, "SLICE_KERNELS", True)],
             "torch": [(sampling, "SLICE_KERNELS", False)]},
    "prefill": {"burst": [(refill, "PREFILLS_PER_STEP", None), (refill, "TOP_UP_BELOW", 1)]},
}


def changes(spec: str) -> list[tuple[str, Any]]:
    """A run name's changes after its kind, `+attn=L-B-W-S` (the decode attention's launch
    shape, triton_decode.Tuning), `+topk=N` (sampling.TOPK_SLICES), `+prefix=B-S` (the prefix
    loop's block and stages, triton_decode.PREFIX), `+draw=triton|torch` and `+prefill=burst`
    (SWITCHES), as (what, value). Raises ValueError on one it does not know
    or cannot read."""
    out: list[tuple[str, Any]] = []
    for part in spec.split("+")[1:]:
        what, _, value = part.partition("=")
        try:
            if what == "attn":
                out.append((what, parse_shape(value, "-")))
            elif what == "topk":
                if not value.isdigit():
                    raise ValueError
                out.append((what, int(value)))
            elif what == "prefix":
                out.append((what, parse_prefix(value, "-")))
            elif value in SWITCHES.get(what, {}):
                out.append((what, value))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"unknown run change {part!r}: +attn=lines-block-warps-stages, "
                             f"+topk=slices, +prefix=block-stages, +draw=triton|torch or "
                             f"+prefill=burst") from None
    return out


def run_kind(name: str) -> str:
    """A run name's kind: what comes before its changes and rows
    (`stop-refill+topk=64@381` -> `stop-refill`)."""
    return name.partition("@")[0].partition("+")[0]


def run_context(name: str, model: Any) -> Any:
    """What a run changes for its run: by its kind, the old KV scatter, the old refill
    threshold, or diverse answers; by its name, the changes `changes` reads."""
    kind = run_kind(name)
    stack = ExitStack()
    if kind == "defaults-scatter":
        stack.enter_context(mock.patch("patchdb.generate.kv_writes.offer", return_value=False))
    elif kind == "stop-refill-16":
        stack.enter_context(mock.patch("patchdb.generate.refill.REFILL_FRACTION", 1 / 16))
    elif kind.endswith("-diverse"):
        stack.enter_context(diverse_answers(model))
    for what, value in changes(name.partition("@")[0]):
        patches = ([(*SETTINGS[what], value)] if what in SETTINGS else SWITCHES[what][value])
        for module, setting, to in patches:
            stack.enter_context(mock.patch.object(module, setting, to))
    return stack


def run_specs(runs: str, batch_size: int | None) -> list[tuple[str, str, int | None]]:
    """`--runs` as (name, kind, rows): a run is a FULL_LAYER_RUNS kind, then any changes
    (`changes`), then @rows for a fixed batch (an A/B in one process:
    `defaults,defaults@384,defaults+attn=16-16-2-4`). Raises ValueError on a name it does not
    know, before any model is built."""
    out = []
    for name in runs.split(","):
        spec, at, rows = name.partition("@")
        kind = run_kind(name)
        if kind not in FULL_LAYER_RUNS or (at and (not rows.isdigit() or int(rows) == 0)):
            raise ValueError(f"unknown --full-layer run {name!r}: one of "
                             f"{', '.join(FULL_LAYER_RUNS)}, optionally +changes and @rows")
        changes(spec)
        if name in (n for n, _, _ in out):
            raise ValueError(f"--runs names {name!r} twice")
        out.append((name, kind, int(rows) if at else batch_size))
    return out


def experiment_name(shape: str, name: str) -> str:
    """The store's experiment for a run: the shape and the run's name, each character other
    than a letter, digit or hyphen a hyphen (`defaults+attn=16-16-2-4@384` ->
    `gemma3-27b-defaults-attn-16-16-2-4-at-384`)."""
    spec, at, rows = name.partition("@")
    return re.sub(r"[^A-Za-z0-9-]", "-", f"{shape}-{spec}" + (f"-at-{rows}" if at else ""))


def answer_spread(answers: dict[Any, Any]) -> dict[str, float]:
    """How alike a run's answers are: a unit's distinct texts over its samples (1.0: no two
    alike; averaged over units) and an answer's distinct words over its words (averaged over
    answers). A random-init model's answers may repeat: rows that hold the same values make the
    matmuls draw less power, which on a power-capped card moves the clock (compare runs)."""
    units: dict[Any, list[str]] = {}
    for key, (text, _, _) in answers.items():
        units.setdefault(key[:4], []).append(text)
    distinct = [len(set(texts)) / len(texts) for texts in units.values()]
    split = (text.split() for text, _, _ in answers.values())
    words = [len(set(w)) / len(w) for w in split if w]
    return {"distinct_fraction": sum(distinct) / max(len(distinct), 1),
            "distinct_words_fraction": sum(words) / max(len(words), 1)}


def without_window(r: dict[str, Any], window_s: float) -> None:
    """The run's time less the profiler window's (its few steps run slower)."""
    r["wall_s"] -= window_s
    r["tok_s"] = r["tokens"] / r["wall_s"]
    r["tok_s_steady"] = r["tokens"] / max(r["wall_s"] - r["setup_s"], 1e-9)
    if r.get("tok_s_before_drain"):
        stats = r["refill_stats"]
        r["tok_s_before_drain"] = ((r["tokens"] - sum(x["drain_tokens"] for x in stats))
                                   / max(r["wall_s"] - r["setup_s"]
                                         - sum(x["drain_s"] for x in stats), 1e-9))


def without_changes(name: str) -> str:
    """A run's name less its changes, its rows kept (`defaults+attn=8-32-2-2@381` ->
    `defaults@381`): the run it is an A/B against."""
    _, at, rows = name.partition("@")
    return run_kind(name) + at + rows


def uniform_base(name: str) -> str:
    """The uniform-length run an early-stop run is compared with: defaults, or
    defaults-diverse for a -diverse kind, with the same changes and rows
    (`stop-refill-diverse+topk=64@381` -> `defaults-diverse+topk=64@381`)."""
    kind = run_kind(name)
    base = "defaults-diverse" if kind.endswith("-diverse") else "defaults"
    return base + name[len(kind):]


def differing_rows(answers: dict[str, dict[Any, Any]]) -> dict[str, Any]:
    """Rollouts that differ, key by key, between runs of the same work that batch rows
    differently (continuous batching against fixed batches) or run other kernels (compiled
    layers against eager ones). In bf16 they may differ where two tokens are near-tied, as
    kernels round differently at other row counts or fusions."""
    out: dict[str, Any] = {}
    for a, b in (("stop-refill", "stop-shrink"), ("stop-refill", "stop-keep"),
                 ("stop-paged", "stop-refill"),
                 ("defaults", "fixed"), ("stop-shrink", "stop-keep"),
                 ("defaults", "compile-off"), ("defaults", "defaults-scatter"),
                 ("stop-refill", "stop-refill-16"),
                 *((without_changes(n), n) for n in answers if "+" in n),
                 *((n.partition("@")[0], n) for n in answers if "@" in n and "+" not in n)):
        if a in answers and b in answers:
            keys = answers[a].keys() & answers[b].keys()
            differ = sum(answers[a][k] != answers[b][k] for k in keys)
            out[f"{a} vs {b}"] = {"rows": len(keys), "differ": differ}
            print(f"{a} vs {b}: {differ} of {len(keys)} rollouts differ", flush=True)
    return out


def one_drain_minutes(r: dict[str, Any], full_tokens: int) -> float | None:
    """The full sweep projected with one drain, as `patchdb generate` streams every patch
    layer's units through one refill loop and drains once, at its end: the tokens before the
    drain at the rate before it, then this run's set-up and drain once. (The full sweep min
    column repeats the one patch layer's drain for every layer: an upper bound.)"""
    stats = r.get("refill_stats") or []
    if not r.get("tok_s_before_drain") or len(stats) != 1 or not stats[0].get("drain_s"):
        return None
    before = full_tokens - stats[0]["drain_tokens"]
    return float((before / r["tok_s_before_drain"] + r["setup_s"] + stats[0]["drain_s"]) / 60)


def summarize_full_layer(results: dict[str, Any], weights: int, flops: float) -> None:
    """Projections for the full default sweep, the speed-up over the loop and the fraction of
    the compute floor (2 FLOPs per weight per token at the measured matmul rate; `weights`: the
    model's weight count, its embedding once)."""
    out = results["full_layer"]
    runs, loop = out["runs"], out.get("loop")
    full_tokens = FULL_SWEEP_ROLLOUTS * results["new_tokens"]
    floor_s = full_tokens * 2 * weights / flops
    out["full_sweep_tokens"], out["compute_floor_min"] = full_tokens, floor_s / 60
    print("\n| run | rows | rollouts | tok/s | steady tok/s | set-up s | full sweep min "
          "| one drain | of floor | x loop | peak GiB (of card) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        # A full sweep is one process: set-up once, then the steady rate.
        r["projected_full_sweep_min"] = (full_tokens / r["tok_s_steady"] + r["setup_s"]) / 60
        one = one_drain_minutes(r, full_tokens)
        if one is not None:
            r["projected_full_sweep_min_one_drain"] = one
        r["floor_fraction"] = floor_s / 60 / r["projected_full_sweep_min"]
        if loop:
            r["speedup_over_loop"] = r["tok_s"] / loop["tok_s"]
            r["full_sweep_speedup"] = full_tokens / loop["tok_s"] / 60 / r["projected_full_sweep_min"]
        print(f"| {name} | {r['batch_size']} | {r['rollouts']} | {r['tok_s']:.0f} | "
              f"{r['tok_s_steady']:.0f} | {r['setup_s']:.1f} | {r['projected_full_sweep_min']:.1f} | "
              f"{'' if one is None else f'{one:.1f}'} | "
              f"{r['floor_fraction']:.2f} | {r.get('full_sweep_speedup', float('nan')):.1f} | "
              f"{r['peak_reserved_gib']:.1f} ({r['peak_reserved_gib'] / max(r['card_gib'], 1e-9):.0%}) |")
    stops = {kind for kind, (_, stop, _, _) in FULL_LAYER_RUNS.items() if stop}
    for stopped in (n for n in runs if run_kind(n) in stops):
        base = uniform_base(stopped)
        if base in runs:
            ratio = runs[stopped]["tok_s_steady"] / runs[base]["tok_s_steady"]
            runs[stopped]["of_uniform_rate"] = ratio
            print(f"{stopped}: useful steady tok/s {ratio:.0%} of the uniform-length rate "
                  f"({base}, {runs[base]['batch_size']} rows)")
            before, uniform = (runs[stopped].get("tok_s_before_drain"),
                               runs[base].get("tok_s_before_drain"))
            if before and uniform:  # a sweep in one process drains once, at its end
                runs[stopped]["of_uniform_rate_before_drain"] = before / uniform
                print(f"{stopped}: before the drain {before:.0f} tok/s, {before / uniform:.0%} of "
                      f"the uniform run's {uniform:.0f} before its drain")
    if loop:
        out["loop_full_sweep_h"] = full_tokens / loop["tok_s"] / 3600
        print(f"| per-key loop ({loop['units']} units) | 64 | {loop['units'] * 64} | "
              f"{loop['tok_s']:.0f} | | | {out['loop_full_sweep_h'] * 60:.0f} | | 1.0 | |")
    print(f"compute floor of the full sweep: {floor_s / 60:.1f} min ({full_tokens / 1e6:.2f}M tokens "
          f"x 2 x {weights / 1e9:.1f}B FLOP at "
          f"{flops / 1e12:.0f} TFLOP/s)")
