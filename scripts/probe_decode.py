"""Probe decode-step variants on a GPU: eager DynamicCache, eager StaticCache, and a StaticCache
decode step captured in a CUDA graph. Prints step times and the largest logit difference of the
graph replay against the eager static step. For deciding how the engine should decode.

    python scripts/probe_decode.py --shape gemma3-27b --layers 8 --rows 64,128
"""

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SHAPES, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gemma3-27b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", default="64,128")
    parser.add_argument("--prompt", type=int, default=177)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from transformers import DynamicCache, StaticCache

    SHAPES[args.shape]["num_hidden_layers"] = args.layers
    dev = "cuda:0"
    model = build_model(args.shape, dev, torch.bfloat16)
    vocab = model.config.vocab_size
    for rows in [int(r) for r in args.rows.split(",")]:
        ids = torch.randint(0, vocab, (rows, args.prompt), device=dev)
        length = args.prompt + args.steps + 2
        with torch.inference_mode():
            # eager dynamic
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            dyn = (time.perf_counter() - t) / args.steps
            print(f"rows {rows}: eager dynamic step {dyn * 1e3:.1f} ms", flush=True)
            # eager static
            try:
                scache = StaticCache(config=model.config, max_cache_len=length)
                pos = torch.arange(args.prompt, device=dev)[None].expand(rows, -1)
                out = model(input_ids=ids, cache=scache, position_ids=pos, use_cache=True,
                            logits_to_keep=1)
                tok0 = out.logits[:, -1].argmax(-1, keepdim=True)
                step_pos = torch.full((rows, 1), args.prompt, device=dev, dtype=torch.long)
                torch.cuda.synchronize()
                t = time.perf_counter()
                tok = tok0
                for i in range(args.steps):
                    step_pos.fill_(args.prompt + i)
                    out = model(input_ids=tok, cache=scache, position_ids=step_pos, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                sta = (time.perf_counter() - t) / args.steps
                print(f"rows {rows}: eager static step {sta * 1e3:.1f} ms", flush=True)
            except Exception:
                traceback.print_exc()
                continue
            # graph
            try:
                gcache = StaticCache(config=model.config, max_cache_len=length)
                pos = torch.arange(args.prompt, device=dev)[None].expand(rows, -1)
                model(input_ids=ids, cache=gcache, position_ids=pos, use_cache=True, logits_to_keep=1)
                static_tok = tok0.clone()
                static_pos = torch.full((rows, 1), args.prompt, device=dev, dtype=torch.long)
                def _counter(layer):  # type: ignore[no-untyped-def]
                    c = getattr(layer, "cumulative_length", None)
                    return c.clone() if isinstance(c, torch.Tensor) else None

                snapshot = [(layer.keys.clone(), layer.values.clone(), _counter(layer))
                            for layer in gcache.layers]
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        model(input_ids=static_tok, cache=gcache, position_ids=static_pos, use_cache=True)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                t = time.perf_counter()
                with torch.cuda.graph(graph):
                    gout = model(input_ids=static_tok, cache=gcache, position_ids=static_pos, use_cache=True)
                capture = time.perf_counter() - t
                # restore the cache as it was after prefill, then replay and compare with eager static
                for layer, (k, v, c) in zip(gcache.layers, snapshot, strict=True):
                    layer.keys.copy_(k)
                    layer.values.copy_(v)
                    if c is not None:
                        layer.cumulative_length.copy_(c)
                static_tok.copy_(tok0)
                static_pos.fill_(args.prompt)
                graph.replay()
                torch.cuda.synchronize()
                scache2 = StaticCache(config=model.config, max_cache_len=length)
                model(input_ids=ids, cache=scache2, position_ids=pos, use_cache=True, logits_to_keep=1)
                ref = model(input_ids=tok0, cache=scache2, position_ids=static_pos, use_cache=True).logits
                diff = (gout.logits.float() - ref.float()).abs().max().item()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for i in range(args.steps):
                    static_pos.fill_(args.prompt + 1 + i)
                    graph.replay()
                    static_tok.copy_(gout.logits[:, -1].argmax(-1, keepdim=True))
                torch.cuda.synchronize()
                gra = (time.perf_counter() - t) / args.steps
                print(f"rows {rows}: graph static step {gra * 1e3:.1f} ms (capture {capture:.1f}s, "
                      f"max |logit diff| vs eager {diff:.3g})", flush=True)
            except Exception:
                traceback.print_exc()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
