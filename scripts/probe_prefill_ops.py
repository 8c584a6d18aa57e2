"""How many PyTorch operations one refill prefill call issues, by kind, and its wall time.

A prefill of 16 units runs while a decode step does, and on a GPU machine its host time (about
160 ms on an H200's host, docs/performance.md) is mostly per operation: every operation costs
the host a dispatch and most a kernel launch, whatever the model's width. So the count on a
model of Gemma-3-27B's depth (62 layers, its sliding-window pattern) and a tiny width, on the
CPU, tracks what a call costs the GPU machine's host. The wall time here is the CPU's own
compute as well, and moves with the machine's load: read the count.

    python scripts/probe_prefill_ops.py [--units 16] [--layers 62] [--out ops.json]
"""

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_tokenizer  # noqa: E402

from patchdb.config import DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL  # noqa: E402
from patchdb.generate.engine import Engine, TargetUnit  # noqa: E402
from patchdb.generate.layers import find_layers  # noqa: E402
from patchdb.generate.prompt import render_prompt  # noqa: E402
from patchdb.generate.sampling import Sampling  # noqa: E402
from patchdb.generate.unit_queue import UnitQueue  # noqa: E402


class Count(TorchDispatchMode):
    """Counts the aten operations dispatched while it is on, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--layers", type=int, default=62)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    hidden = 64
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=128,
                              num_hidden_layers=args.layers, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, sliding_window=1024,
                              max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16).eval()
    prompt = render_prompt(tok, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
    steer, patch = round(args.layers * 38 / 62), round(args.layers * 40 / 62)
    engine = Engine(model, find_layers(model), prompt.input_ids, prompt.injection_start, steer, [],
                    graph_replay=False, share_prefix=True)

    def vector(seed: int) -> torch.Tensor:
        return torch.randn(hidden, generator=torch.Generator().manual_seed(seed)).to(model.dtype)

    source = engine.source_run(vector(1), [patch])
    units = [(i, TargetUnit(vector(10 + i), patch, source[patch], list(range(64))))
             for i in range(args.units)]
    with torch.inference_mode():
        decoder = engine._graphed_decoder(64, len(prompt.input_ids) + 100, 8, 0)
        assert decoder is not None
        queue = UnitQueue(engine, decoder, iter([]), Sampling(1.0, top_k=64, top_p=0.95))

        def call() -> None:
            queue.prefill(units)
            queue.chunks.clear()

        call()  # the shared prefix's own forward runs once, in the first call
        with Count() as count:
            call()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    total = sum(count.ops.values())
    print(f"one prefill call of {args.units} units, {args.layers} layers, prompt "
          f"{len(prompt.input_ids)} tokens ({prompt.injection_start} shared): {total} operations; "
          f"{sorted(times)[3] * 1e3:.0f} ms on this CPU (median of 7)")
    for name, n in count.ops.most_common(20):
        print(f"{n:7d}  {name}")
    if args.out is not None:
        args.out.write_text(json.dumps({"units": args.units, "layers": args.layers,
                                        "operations": total, "by_kind": dict(count.ops),
                                        "cpu_ms_median": sorted(times)[3] * 1e3}, indent=2))


if __name__ == "__main__":
    main()
