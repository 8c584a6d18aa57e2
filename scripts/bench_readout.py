"""The first-token readout pass and `patchdb verify` on one GPU, on a random-init model of a real
shape (default: Gemma-3-27B's text stack in bf16; nothing is downloaded, and the time does not
depend on weight values). Three runs, through the real stage code, each store a fresh SQLite file:

  1. `generate --readout-only` over the whole default sweep (4 experiments, 18 words, patch
     layers 40-60: 3,696 patched units and 27 baselines, one prefill row each);
  2. the controls' readouts: the default sweep with controls = [random_vector,
     unrelated_questions], `--readout-only --layers 40` (one patch layer: its 176 units, the 27
     baselines, 26 random-vector units, each asked the trial question and the 20 unrelated
     questions, plus 3 no-injection arms), projected to all 21 patch layers from the time per
     prefill row and the source runs, which do not grow with the layers;
  3. `patchdb verify` on the sweep of run 1 (compiled, 16 greedy tokens).

    python scripts/bench_readout.py --out scripts/results/readout_gemma3-27b_h100.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_generate import GEMMA_SAMPLING, SHAPES, build_model  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timed:
    """Wraps Engine methods to time each call (synchronised), with the rows it handled."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, int]]] = {"readout_logits": [], "source_run": []}

    def __enter__(self) -> "Timed":
        from patchdb.generate.engine import Engine

        self.saved = {name: getattr(Engine, name) for name in self.calls}
        for name, original in self.saved.items():
            setattr(Engine, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original: Any) -> Any:
        def timed(engine: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
            sync()
            t = time.perf_counter()
            out = original(engine, first, *args, **kwargs)
            sync()
            rows = len(first) if isinstance(first, list) else 1
            self.calls[name].append((time.perf_counter() - t, rows))
            return out

        return timed

    def __exit__(self, *exc: Any) -> None:
        from patchdb.generate.engine import Engine

        for name, original in self.saved.items():
            setattr(Engine, name, original)

    def summary(self) -> dict[str, Any]:
        return {name: {"calls": len(c), "rows": sum(r for _, r in c),
                       "seconds": sum(t for t, _ in c)} for name, c in self.calls.items()}


CUDA = torch.cuda.is_available()


def readout_run(loaded: Any, workdir: Path, name: str, controls: list[str],
                layers: list[int] | None) -> dict[str, Any]:
    """One `generate --readout-only` on a fresh store of the default sweep (named `name`)."""
    from patchdb.config import SweepConfig, validate
    from patchdb.generate.stage import GenerateOptions, run_generate
    from patchdb.store import open_store
    from patchdb.store.sweeps import register_sweep

    n = loaded.model.config.num_hidden_layers
    depth = {} if n == 62 else dict(  # a smaller shape (a check on the CPU): scaled layers
        steer_layer=round(n * 38 / 62), patch_layers=f"{round(n * 38 / 62) + 2}-{n - 2}")
    config = validate(SweepConfig(name=name, model=loaded.model_id, controls=controls, **depth))
    if layers is not None:
        layers = config.layers[:1]
    store = open_store(str(workdir / f"{name}.sqlite"), create=True)
    store.transact(lambda s: register_sweep(s, config))
    options = GenerateOptions(device=str(loaded.device), readout_only=True, layers=layers)
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with Timed() as timed:
        sync()
        t = time.perf_counter()
        result = run_generate(store, options, progress=False, load=lambda *a, **k: loaded)
        sync()
        wall = time.perf_counter() - t
    out = {"wall_s": wall, "readouts": result.readouts_written,
           "readouts_expected": result.plan.readouts_expected, **timed.summary(),
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if CUDA else 0.0,
           "store": store}
    return out


def verify(store: Any, loaded: Any, device: str, results: dict[str, Any]) -> None:
    """Run 3: `patchdb verify` (run_verify) on the store's sweep, compiled on CUDA."""
    from patchdb.generate.verify import VerifyOptions, run_verify

    sync()
    t = time.perf_counter()
    verified = run_verify(store, VerifyOptions(device=device, compile=CUDA, tokens=16),
                          load=lambda *a, **k: loaded)
    sync()
    results["verify"] = {"wall_s": time.perf_counter() - t,
                         "checks": [vars(c) for c in verified.checks]}
    print(f"3. verify: {results['verify']['wall_s']:.1f} s", flush=True)
    for c in verified.checks:
        print(f"   {c.outcome:<4}  {c.name:<12} {c.detail} ({c.seconds:.1f} s)", flush=True)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-27b")
    parser.add_argument("--sweep-minutes", type=float, default=38.6,
                        help="the full default sweep's generate time to compare with (the "
                             "H200 headline of docs/performance.md)")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--verify-only", action="store_true",
                        help="only run 3, on a fresh store of the default sweep")
    parser.add_argument("--out", type=Path, default=Path("bench_readout.json"))
    args = parser.parse_args()
    from tiny_models import tiny_tokenizer

    from patchdb.generate.loading import LoadedModel

    device, dtype = ("cuda:0", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    t = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    if SHAPES[args.shape]["family"] == "gemma3":
        for key, value in GEMMA_SAMPLING.items():
            setattr(model.generation_config, key, value)
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(),
                         model_id=f"random-init-{args.shape}", device=torch.device(device),
                         dtype=dtype)
    import transformers

    results: dict[str, Any] = {"shape": args.shape, **SHAPES[args.shape],
                               "card": torch.cuda.get_device_name(0) if CUDA else "cpu",
                               "torch": torch.__version__,
                               "transformers": transformers.__version__,
                               "build_s": time.perf_counter() - t}
    print(f"{args.shape} built in {results['build_s']:.1f} s on {results['card']}", flush=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        if args.verify_only:
            from patchdb.config import SweepConfig, validate
            from patchdb.store import open_store
            from patchdb.store.sweeps import register_sweep

            store = open_store(str(Path(tmp) / "verify.sqlite"), create=True)
            config = validate(SweepConfig(name="verify", model=loaded.model_id))
            store.transact(lambda s: register_sweep(s, config))
            verify(store, loaded, device, results)
            store.close()
            save()
            return
        full = readout_run(loaded, Path(tmp), "readout-full", [], None)
        store = full.pop("store")
        results["readout_only_full_sweep"] = full
        print(f"1. --readout-only, full default sweep: {full['readouts']} readouts in "
              f"{full['wall_s']:.1f} s ({full['readout_logits']['seconds']:.1f} s in "
              f"{full['readout_logits']['calls']} prefill batches, "
              f"{full['source_run']['calls']} source runs in {full['source_run']['seconds']:.1f} s)"
              f", peak {full['peak_reserved_gib']:.1f} GiB", flush=True)
        save()

        ctl = readout_run(loaded, Path(tmp), "readout-controls", ["random_vector",
                                                                   "unrelated_questions"], [40])
        ctl.pop("store").close()
        per_row = ctl["readout_logits"]["seconds"] / ctl["readout_logits"]["rows"]
        full_rows = 3_696 + 27 + 26 + 20 * (3_696 + 27 + 26 + 3)
        other = ctl["wall_s"] - ctl["readout_logits"]["seconds"]  # vectors, source runs, writing
        projected = other + per_row * full_rows
        extra = projected - full["wall_s"]
        ctl.update(per_row_ms=per_row * 1e3, full_sweep_rows=full_rows,
                   projected_full_sweep_s=projected, extra_over_readout_only_s=extra,
                   extra_fraction_of_sweep=extra / (args.sweep_minutes * 60))
        results["controls_one_layer"] = ctl
        print(f"2. controls, --layers 40: {ctl['readouts']} readouts in {ctl['wall_s']:.1f} s "
              f"({per_row * 1e3:.2f} ms a prefill row; {ctl['source_run']['calls']} source runs "
              f"in {ctl['source_run']['seconds']:.1f} s); projected to 21 layers "
              f"({full_rows:,} rows): {projected:.0f} s, {extra:.0f} s more than run 1, "
              f"{100 * extra / (args.sweep_minutes * 60):.1f}% of a {args.sweep_minutes}-min "
              "sweep", flush=True)
        save()

        if not args.skip_verify:
            verify(store, loaded, device, results)
        store.close()
    save()


if __name__ == "__main__":
    main()
