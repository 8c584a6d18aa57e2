"""The sampler alone, for bench_generate.py (`--sampler-only`, or before a model bench): random
logits over a vocabulary on the device, each draw timed over repeated calls."""

import time
from typing import Any
from unittest import mock

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ms_per_call(fn: Any, device: str, repeats: int) -> float:
    """Milliseconds a call of fn(i), i the call's index, over `repeats` calls after 3."""
    for i in range(3):
        fn(i)
    sync(device)
    t = time.perf_counter()
    for i in range(repeats):
        fn(i)
    sync(device)
    return (time.perf_counter() - t) / repeats * 1e3


def sampler_times(device: str, rows: int, vocab: int, repeats: int = 20) -> dict[str, Any]:
    """Milliseconds per choose_tokens call on random float32 logits of [rows, vocab] on the
    device, rounded through bf16 first as the engine's logits are (so top-k ties occur as they
    do in a real run): the full softmax, top-k 64 then top-p 0.95, and top-p 0.95 alone."""
    from patchdb.generate.sampling import Sampling, choose_tokens

    gen = torch.Generator(device="cpu").manual_seed(5)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(device, torch.bfloat16).float()
    seeds = torch.arange(rows, device=device)
    out: dict[str, Any] = {"rows": rows, "vocab": vocab, "logits_dtype": "bfloat16 -> float32"}
    for name, how in (("full_softmax", Sampling(1.0)), ("top_k64_top_p095", Sampling(1.0, 64, 0.95)),
                      ("top_p095_only", Sampling(1.0, 0, 0.95))):
        out[f"{name}_ms"] = ms_per_call(
            lambda step, how=how: choose_tokens(logits, seeds, step, how), device, repeats)
    out.update(topk_slices_times(logits.to(torch.bfloat16), seeds, device, repeats))
    return out


def topk_slices_times(logits: Any, seeds: Any, device: str, repeats: int) -> dict[str, Any]:
    """On bf16 logits, as the engine draws from them: the top-k 64 / top-p 0.95 draw and its
    selection alone (the 128 best a row), in one pass and in two (sampling.TOPK_SLICES: the
    slices with the highest maxima, then their entries), with the tokens each two-pass draw
    gives against the one-pass draw's."""
    from patchdb.generate import sampling

    how = sampling.Sampling(1.0, 64, 0.95)
    picks = sampling.TIE_MARGIN + 64

    out: dict[str, Any] = {"topk_slices": {}, "topk_slices_torch": {}}
    with mock.patch.object(sampling, "TOPK_SLICES", 0):
        want = [sampling.choose_tokens(logits, seeds, step, how) for step in range(4)]
    # each split with the slice kernels where they run (triton_topk.py), then the shipped split
    # by PyTorch's amax, gather and cat (sampling.SLICE_KERNELS off)
    runs = [(n, True) for n in (0, 512, 1024, 2048, 4096, 8192)] + [(sampling.TOPK_SLICES, False)]
    for slices, kernels in runs:
        with mock.patch.object(sampling, "TOPK_SLICES", slices), \
                mock.patch.object(sampling, "SLICE_KERNELS", kernels):
            draw = ms_per_call(lambda _: sampling.choose_tokens(logits, seeds, 0, how), device,
                               repeats)
            select = ms_per_call(lambda _: sampling._topk(logits, picks), device, repeats)
            differ = sum(int((sampling.choose_tokens(logits, seeds, step, how) != w).sum())
                         for step, w in enumerate(want))
        key = "topk_slices" if kernels else "topk_slices_torch"
        out[key][str(slices)] = {"draw_ms": draw, "select_ms": select,
                                 "tokens_differ": differ, "tokens": 4 * len(seeds)}
        how_split = "one pass" if slices < 2 else f"{slices} slices" + ("" if kernels else
                                                                       " by PyTorch")
        print(f"top-k in {how_split} (bf16 logits): draw {draw:.2f} ms, selection "
              f"{select:.2f} ms, {differ} of {4 * len(seeds)} tokens differ from one pass",
              flush=True)
    return out
