"""What a random-init model of Gemma-3-27B's width and depth answers, on the CPU in a minute.

    python scripts/probe_random_answers.py                 # the bench's model as built
    python scripts/probe_random_answers.py --scale 0.5     # the embedding halved (bench kinds
                                                           # *-diverse)

The model has the real width (5376), depth (62 layers) and vocabulary (262,208, embedding tied
to the output), but one attention head and a 64-wide MLP. Gemma-3 normalizes every attention and
MLP output before adding it to the residual stream, so each adds a vector of the same length
whatever the layer's width. The residual's make-up (the embedding of the token just fed against
62 layers' random contributions), which decides how peaked the next-token draw is, should then
be about the full model's. On an H100 the full model's answers agreed with this: compiled and
eager layers (bf16, rounding differently) gave the same 11,264 answers, as only a draw with no
near-ties does. Wider layers keep the answer: with 8 heads and a 1,024-wide MLP the fed token
has 95% of the top-64 mass, with 16 heads and 2,048 (11 GB, two minutes) 99.8%, and every
sampled answer repeats it. It prints the probability of the top tokens after the default
prompt, the share of the top-64 mass that top-p sees on the first, and a few sampled answers
(top-k 64, top-p 0.95: the bench's settings).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny_models import tiny_tokenizer  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from patchdb.config import DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL  # noqa: E402
from patchdb.generate.prompt import render_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=62)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the embedding by this")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (the real: 32)")
    parser.add_argument("--intermediate", type=int, default=64, help="MLP width (the real: 21504)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()
    config = Gemma3TextConfig(vocab_size=262208, hidden_size=5376,
                              intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads,
                              num_key_value_heads=max(1, args.heads // 2), head_dim=128,
                              sliding_window=1024,
                              max_position_embeddings=4096)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t = time.perf_counter()
    try:
        model = Gemma3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(args.scale)
    print(f"built in {time.perf_counter() - t:.0f} s; embedding scaled by {args.scale}")
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([render_prompt(tokenizer, DEFAULT_PROMPT_INTRO,
                                      DEFAULT_PROMPT_TRIAL).input_ids])
    with torch.no_grad():
        probs = model(ids).logits[0, -1].float().softmax(-1)
        top = probs.topk(64)
        print(f"the prompt's last token: {ids[0, -1].item()}; top tokens "
              f"{top.indices[:5].tolist()} at p {[round(p, 4) for p in top.values[:5].tolist()]}")
        print(f"the first token's share of the top-64 mass: {top.values[0] / top.values.sum():.3f}")
        out = model.generate(ids.repeat(args.samples, 1), do_sample=True, top_k=64, top_p=0.95,
                             max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    for row in out[:, ids.shape[1]:].tolist():
        print("answer:", row)


if __name__ == "__main__":
    main()
