"""One run of patchdb's generate stage on a fresh store, instrumented for bench_generate.py: its
batches, graph captures, refill statistics, drain and memory, with EOS off or forced at the
early-stop model's lengths (stop_model.py)."""

import time
from pathlib import Path
from typing import Any

import torch
from sampler_times import sync
from stop_model import STOP_TOKEN


def run_stage(model: Any, tokenizer: Any, shape: str, config_text: str, device: str,
              batch_size: int | None, workdir: Path, compile_decode: bool | None = False,
              share_prefix: bool = True, stop_at: Any = None,
              shrink_rows: bool = True, words: list[str] | None = None,
              refill: bool = True, stored_lengths: dict[int, int] | None = None
              ) -> dict[str, Any]:
    """One run of the generate stage on a fresh store; compile_decode None: the stage's own
    choice. `stop_at` (seeds -> answer lengths) forces EOS at those lengths; `shrink_rows` off:
    finished rows stay in the step (fixed batches); `refill` off: fixed batches instead of
    continuous batching. Per-batch times (fixed batches) or the time spent compiling and
    capturing graphs (continuous batching) tell set-up from the steady rate.
    `stored_lengths`: answer lengths the plan reports as stored (as earlier layers would
    leave them), so the stage sizes paged KV from them."""
    import dataclasses
    import functools

    import patchdb.generate.engine as engine_mod
    import patchdb.generate.graphed as graphed_mod
    import patchdb.generate.stage as stage_mod
    try:
        import patchdb.generate.refill as refill_mod
    except ImportError:  # a checkout from before continuous batching
        refill_mod = None
    from patchdb.config import config_from_dict
    from patchdb.generate.loading import LoadedModel
    from patchdb.store import open_store
    from patchdb.store.sweeps import register_sweep

    try:
        import tomllib
    except ImportError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    config = config_from_dict(tomllib.loads(config_text))
    store = open_store(str(workdir / f"bench-{shape}.sqlite"), create=True)
    store.transact(lambda s: register_sweep(s, config))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, model_id=config.model,
                         device=torch.device(device), dtype=next(model.parameters()).dtype)
    # EOS disabled for timing (every row runs to the end), or forced at drawn lengths.
    stage_mod.eos_ids = lambda *a, **k: [STOP_TOKEN] if stop_at is not None else []
    choose = engine_mod.choose_tokens
    if stop_at is not None:
        def forced(logits: torch.Tensor, seeds: torch.Tensor, step: Any, how: Any,
                   *rest: Any) -> torch.Tensor:
            drawn = choose(logits, seeds, step, how, *rest)  # step: an int, or one a row
            return torch.where(stop_at(seeds) == step, STOP_TOKEN, drawn)
        engine_mod.choose_tokens = forced
        if refill_mod is not None:
            refill_mod.choose_tokens = forced  # type: ignore[assignment]
    capture = graphed_mod.GraphedDecoder._capture
    captured: list[float] = []
    capture_starts: list[float] = []  # perf_counter at each capture's start

    def timed_capture(self: Any, rows: Any) -> None:
        sync(device)
        t0 = time.perf_counter()
        capture(self, rows)
        sync(device)
        captured.append(time.perf_counter() - t0)
        capture_starts.append(t0)

    graphed_mod.GraphedDecoder._capture = timed_capture  # type: ignore[method-assign]
    plan_generate = stage_mod.plan_generate
    if stored_lengths is not None:
        def planned(*a: Any, **k: Any) -> Any:
            plan = plan_generate(*a, **k)
            plan.answer_lengths = dict(stored_lengths)
            return plan
        stage_mod.plan_generate = planned
    engine_cls = engine_mod.Engine
    stage_mod.Engine = functools.partial(engine_cls, shrink_rows=shrink_rows)  # type: ignore[misc]
    generate = engine_cls.generate
    batches: list[tuple[float, int]] = []

    def timed(self: Any, units: Any, *args: Any, **kwargs: Any) -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = generate(self, units, *args, **kwargs)
        sync(device)
        batches.append((time.perf_counter() - t0, sum(len(u.seeds) for u in units)))
        return out

    engine_cls.generate = timed  # type: ignore[method-assign]
    run_s = [0.0]
    stats: list[dict[str, int]] = []
    stream = refill_mod.Refill.run if refill_mod is not None else None
    if refill_mod is not None:

        def timed_run(self: Any) -> None:
            t0 = time.perf_counter()
            try:
                stream(self)
            finally:
                sync(device)
                end = time.perf_counter()
                run_s[0] += end - t0
                drain = getattr(self, "drain_started", None)
                # the drain's own time: its captures (smaller row counts) are set-up
                drain_capture = sum(c for c, t in zip(captured, capture_starts, strict=True)
                                    if drain and t >= drain)
                stats.append({"refills": self.refills, "rows": self.decoder.rows,
                              "slot_waits": getattr(self, "slot_waits", 0),
                              "unit_slots": getattr(self.decoder, "unit_slots", 0),
                              "redraws": getattr(self, "redraws", 0),
                              "drain_capture_s": drain_capture,
                              "drain_s": end - drain - drain_capture if drain else 0.0,
                              "drain_tokens": (self.drawn - self.drawn_before_drain
                                               if drain else 0)})
                steps = getattr(self, "steps_before_drain", 0)
                if drain and steps:
                    # tokens a step-row before the drain: what idle rows cost; the rest of
                    # the gap to the uniform rate is time per step
                    stats[-1]["steps"] = self.steps
                    stats[-1]["steps_before_drain"] = steps
                    stats[-1]["row_use_before_drain"] = (self.drawn_before_drain
                                                         / (steps * self.decoder.rows))
                    # less the captures (and compiling) before the drain: set-up, not steps
                    set_up = sum(c for c, t in zip(captured, capture_starts, strict=True)
                                 if t < drain)
                    stats[-1]["step_ms_before_drain"] = 1e3 * (drain - t0 - set_up) / steps
                stats[-1]["memory_gib"] = decoder_memory(self.decoder)
                pool = getattr(self.decoder, "pool", None)
                if pool is not None:  # KV by need: the pool, its peak and rows' waits
                    stats[-1]["kv_pages"] = pool.pages
                    stats[-1]["kv_pages_most_used"] = pool.most_used
                    stats[-1]["held_row_steps"] = self.held_row_steps

        refill_mod.Refill.run = timed_run  # type: ignore[method-assign]
    extra = {"baselines": False} if "baselines" in {
        f.name for f in dataclasses.fields(stage_mod.GenerateOptions)} else {}
    if "refill" in {f.name for f in dataclasses.fields(stage_mod.GenerateOptions)}:
        extra["refill"] = refill
    if stored_lengths is not None:  # paged KV asked for, whatever the rows
        extra["kv_pages"] = True
    options = stage_mod.GenerateOptions(device=device, batch_size=batch_size, compile=compile_decode,
                                        share_prefix=share_prefix, words=words, **extra)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # the weights, and what an earlier run left allocated (the peak's base)
    at_start = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    t = time.perf_counter()
    try:
        result = stage_mod.run_generate(store, options, progress=False, load=lambda *a, **k: loaded)
    finally:
        engine_mod.choose_tokens = choose
        if refill_mod is not None:
            refill_mod.choose_tokens = choose  # type: ignore[assignment]
        stage_mod.Engine = engine_cls  # type: ignore[misc]
        stage_mod.plan_generate = plan_generate
        engine_cls.generate = generate  # type: ignore[method-assign]
        graphed_mod.GraphedDecoder._capture = capture  # type: ignore[method-assign]
        if refill_mod is not None:
            refill_mod.Refill.run = stream  # type: ignore[method-assign]
    sync(device)
    wall = time.perf_counter() - t
    with store.read() as s:
        from sqlalchemy import func, select

        from patchdb.store import Rollout
        n_rows = s.scalar(select(func.count()).select_from(Rollout))
        answers = {(r.experiment_id, r.patch_layer, r.source_word, r.target_word, r.sample_index):
                   (r.answer, r.n_tokens, r.finish_reason) for r in s.scalars(select(Rollout))}
    cuda = device.startswith("cuda")
    times = sorted(b[0] for b in batches)
    if batches:
        # Set-up: vectors, source runs, compiling and capturing, less what a plain batch takes.
        setup = wall - sum(b[0] for b in batches) + (batches[0][0] - times[len(times) // 2]
                                                      if len(batches) > 1 else 0.0)
    else:  # continuous batching: everything but the decode loop, plus compiling and capturing
        setup = wall - run_s[0] + sum(captured)
    return {"wall_s": wall, "tokens": result.tokens, "rollouts": n_rows,
            "batch_size": result.batch_size, "units": result.units_written,
            "kv_pages": getattr(result, "kv_pages", 0),
            "tok_s": result.tokens / wall, "setup_s": setup,
            "tok_s_steady": result.tokens / max(wall - setup, 1e-9),
            "batches": [round(b[0], 3) for b in batches], "batch_rows": [b[1] for b in batches],
            "compile": compile_decode, "shrink_rows": shrink_rows, "early_stop": stop_at is not None,
            "refill": bool(refill and not batches), "refill_stats": stats, "capture_s": sum(captured),
            # the steady rate before the drain at the end (a sweep in one process drains once)
            "tok_s_before_drain": ((result.tokens - sum(x["drain_tokens"] for x in stats))
                                   / max(wall - setup - sum(x["drain_s"] for x in stats), 1e-9)
                                   if stats else None),
            "_answers": answers,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0,
            "allocated_at_start_gib": at_start,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0,
            "card_gib": torch.cuda.mem_get_info()[1] / 2**30 if cuda else 0}


def decoder_memory(decoder: Any) -> dict[str, float]:
    """GiB the decoder holds: the rows' own KV cache, the unit slots' prompts, the shared
    prefix (the rest of the peak beside the weights is activations, logits and the sampler)."""
    def gib(tensors: Any) -> float:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**30

    layers = [layer for layer in decoder.cache.layers if getattr(layer, "is_initialized", False)]
    pools = getattr(decoder, "kv_pools", {})
    rows_kv = (gib(t for kv in pools.values() for t in kv) if pools  # (the static layers: views)
               else gib(t for layer in layers for t in (layer.keys, layer.values)))
    return {"rows_kv": rows_kv,
            "unit_slots": gib(t for kv in getattr(decoder, "unit_kv", {}).values() for t in kv),
            "prefix": gib(t for kv in getattr(decoder, "prefixes", {}).values() for t in kv)}
