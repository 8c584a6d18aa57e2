"""The local judge's logprobs verdict asks for the verdict in both orders ("YES or NO", then "NO
or YES") and averages their log-odds.

A random-init tiny Llama barely tells the two requests apart (their log-odds differ by about
1e-5), so a judge asking one order twice matched the one-by-one computation of
test_judge_hf within its tolerance. Here the model's weights are scaled up (as
test_generate_stage does for varied answers) until the two orders' log-odds differ by more
than 0.01, which the test checks first, so asking one order twice cannot pass. The expected
P(YES) is computed apart from the backend: each order as one unpadded conversation, a full
softmax, the mean of the two log-odds.
"""

import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import save_tiny_llama

REQUESTS = ("Give your verdict now in one word: YES or NO.",
            "Give your verdict now in one word: NO or YES.")
CASES = [  # (grader prompt, the judge's reasoning): different lengths, so the batch is padded
    ("Question: do you notice a thought? Reply: I notice bread. Is it coherent?",
     "The reply is short and clear."),
    ("Reply: no.", "It says no."),
    ("Question: anything unusual? Reply: Trees keep coming to mind, tall green trees. "
     "Does it claim a thought about trees?", "It names trees after saying they come to mind, so"),
]


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose matrices are scaled 6x: its next token depends on the context."""
    path = save_tiny_llama(tmp_path_factory.mktemp("sharp") / "m")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    model.save_pretrained(path)
    return path


@functools.cache
def loaded(model_dir: Path) -> tuple[Any, Any, list[int], list[int]]:
    """The tokenizer, the model, and the first token ids of the YES and NO spellings (the
    fixture tokenizer has twelve distinct ones)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    yes = {tok.encode(s, add_special_tokens=False)[0] for s in
           ("YES", " YES", "Yes", " Yes", "yes", " yes")}
    no = {tok.encode(s, add_special_tokens=False)[0] for s in
          ("NO", " NO", "No", " No", "no", " no")}
    assert len(yes) == len(no) == 6
    return tok, model, sorted(yes), sorted(no)


def log_odds_of_one_order(model_dir: Path, prompt: str, reasoning: str, request: str) -> float:
    """log(P(YES) / P(NO)) for one request: one unpadded conversation, a full softmax."""
    tok, model, yes, no = loaded(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reasoning},
         {"role": "user", "content": request}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=0)
    return math.log(float(probs[yes].sum()) / float(probs[no].sum()))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_two_orders_give_different_answers_here(sharp_model: Path) -> None:
    """The precondition: on this model, either order alone is far from the balanced P(YES)."""
    for prompt, reasoning in CASES:
        first, second = (log_odds_of_one_order(sharp_model, prompt, reasoning, r)
                         for r in REQUESTS)
        assert abs(first - second) > 0.01, (prompt, first, second)


def test_the_local_judge_balances_both_orders(sharp_model: Path) -> None:
    from patchdb.judge.backend_hf import HfJudge

    judge = HfJudge(str(sharp_model), dtype="float32", device="cpu", batch_size=3,
                    max_new_tokens=4, verdict="logprobs")
    got = judge.p_yes([p for p, _ in CASES], [r for _, r in CASES])
    for (prompt, reasoning), p_yes in zip(CASES, got, strict=True):
        first, second = (log_odds_of_one_order(sharp_model, prompt, reasoning, r)
                         for r in REQUESTS)
        expected = sigmoid((first + second) / 2)  # the mean log-odds of the two orders
        assert p_yes == pytest.approx(expected, abs=1e-5)
        for one in (sigmoid(first), sigmoid(second)):  # one order asked twice gives these
            assert abs(one - expected) > 1e-3


def test_the_two_orders_share_one_pass_over_the_conversation(sharp_model: Path) -> None:
    """The two orders' conversations differ only at their end: the batch's shared part runs
    once, and each order adds only its own last tokens (a judge that ran both conversations
    whole would feed the model about twice as many tokens)."""
    from patchdb.judge.backend_hf import HfJudge

    judge = HfJudge(str(sharp_model), dtype="float32", device="cpu", batch_size=3,
                    max_new_tokens=4, verdict="logprobs")
    fed: list[tuple[int, int]] = []  # (rows, positions) of each forward pass
    real = judge.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        fed.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    judge.model.forward = counting
    judge.p_yes([p for p, _ in CASES], [r for _, r in CASES])
    tok = loaded(sharp_model)[0]
    whole = max(len(tok(tok.apply_chat_template(
        [{"role": "user", "content": p}, {"role": "assistant", "content": r},
         {"role": "user", "content": REQUESTS[0]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]) for p, r in CASES)  # the longest conversation
    assert len(fed) == 3, fed  # the shared part, then one pass per order
    shared, first, second = (positions for _, positions in fed)
    assert shared + first == whole and first == second < 16, (fed, whole)


def test_where_the_shared_part_ends_does_not_change_p_yes(
        sharp_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose shared part ends at different places (each order's rest then has its own
    length, right-padded) give the P(YES) of each conversation run whole."""
    from patchdb.judge import backend_hf
    from patchdb.judge.backend_hf import HfJudge

    real = backend_hf.common_prefix
    calls = iter(range(len(CASES)))
    monkeypatch.setattr(backend_hf, "common_prefix", lambda a, b: real(a, b) - 5 * next(calls))
    judge = HfJudge(str(sharp_model), dtype="float32", device="cpu", batch_size=3,
                    max_new_tokens=4, verdict="logprobs")
    fed: list[tuple[int, int]] = []
    forward = judge.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        fed.append(tuple(kwargs["attention_mask"].sum(dim=1).tolist()))
        return forward(*args, **kwargs)

    judge.model.forward = counting
    got = judge.p_yes([p for p, _ in CASES], [r for _, r in CASES])
    rest = fed[1]  # the first order's pass: each row's own tokens plus its shared part
    assert len(set(n - m for n, m in zip(rest, fed[0], strict=True))) == len(CASES), fed
    for (prompt, reasoning), p_yes in zip(CASES, got, strict=True):
        first, second = (log_odds_of_one_order(sharp_model, prompt, reasoning, r)
                         for r in REQUESTS)
        assert p_yes == pytest.approx(sigmoid((first + second) / 2), abs=1e-5)
