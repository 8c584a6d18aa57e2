"""The prompt in the model's chat template and its injection start, on two tokenizers:
the fixture (SmolLM2: a blank line is two "\\n" tokens) and one where "\\n\\n" is one token."""

from typing import Any

import pytest
from tiny_models import tiny_tokenizer
from tokenizers import AddedToken, normalizers

from patchdb.config import DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL
from patchdb.errors import ModelError
from patchdb.generate.prompt import concept_prompt_ids, render_prompt


def _pieces(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([t]) for t in ids]


def test_fixture_tokenizer_splits_the_blank_line_in_two() -> None:
    tok = tiny_tokenizer()
    rendered = render_prompt(tok, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
    # SmolLM2's template: default system prompt, then user / assistant "Ok." / user, then generation prompt
    assert rendered.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>assistant\nOk.<|im_end|>" in rendered.text
    assert rendered.text.endswith(DEFAULT_PROMPT_TRIAL + "<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.input_ids == tok(rendered.text, add_special_tokens=False)["input_ids"]
    pieces = _pieces(tok, rendered.input_ids)
    start = rendered.injection_start
    assert pieces[start - 1] == "."
    assert pieces[start : start + 2] == ["\n", "\n"]
    assert "".join(pieces[start + 2 : start + 6]).startswith("Trial 1")


def test_single_token_blank_line() -> None:
    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken("\n\n", normalized=False, special=False)])
    rendered = render_prompt(tok, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
    pieces = _pieces(tok, rendered.input_ids)
    start = rendered.injection_start
    assert pieces[start] == "\n\n"
    assert pieces[start - 1] == "."
    assert "".join(pieces[start + 1 : start + 5]).startswith("Trial 1")


def test_blank_line_in_the_intro_does_not_confuse_the_start() -> None:
    tok = tiny_tokenizer()
    intro = "First paragraph.\n\nOk, let's get started.\n\nSecond paragraph."
    rendered = render_prompt(tok, intro, DEFAULT_PROMPT_TRIAL)
    pieces = _pieces(tok, rendered.input_ids)
    # the start is in the last user turn, right before "Trial 1"
    after = "".join(pieces[rendered.injection_start :])
    assert after.startswith("\n\nTrial 1: Do you detect")
    assert after.count("Ok, let's get started.") == 0


def test_trial_without_marker_uses_its_blank_line() -> None:
    tok = tiny_tokenizer()
    rendered = render_prompt(tok, "Intro.", "Ready?\n\nQuestion: what do you notice?")
    assert "".join(_pieces(tok, rendered.input_ids[rendered.injection_start :])).startswith(
        "\n\nQuestion"
    )


def test_unlocatable_blank_line_shows_the_tokens_around_trial_1() -> None:
    tok = tiny_tokenizer()
    # a normaliser that drops blank lines: no token's offsets cover the "\n\n" any more
    tok.backend_tokenizer.normalizer = normalizers.Replace("\n\n", "")
    with pytest.raises(ModelError) as err:
        render_prompt(tok, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot locate the blank line before 'Trial 1' in the token offsets")
    assert "tokens around it:" in message and "'rial'" in message


def test_template_that_rewrites_the_trial_is_an_error() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
        "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    with pytest.raises(ModelError, match="changed the trial text"):
        render_prompt(tok, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)


def test_concept_prompt_is_a_single_user_turn_with_generation_prompt() -> None:
    tok = tiny_tokenizer()
    text = tok.decode(concept_prompt_ids(tok, "Bread"))
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nTell me about Bread.<|im_end|>\n<|im_start|>assistant\n"
    )
