"""The experiment prompt in the model's own chat template, and where the injection starts.

The injection start is the first token of the blank line ("\\n\\n") right before "Trial 1". It is
found from the tokenizer's character offsets, because tokenizers split a blank line differently
(Gemma: one "\\n\\n" token; SmolLM2: two "\\n" tokens).
"""

from dataclasses import dataclass
from typing import Any

from patchdb.errors import ModelError

TRIAL_MARKER = "Trial 1"
BLANK_LINE = "\n\n"
ASSISTANT_REPLY = "Ok."
CONCEPT_PROMPT = "Tell me about {word}."


@dataclass
class RenderedPrompt:
    text: str
    input_ids: list[int]
    injection_start: int


def _chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except ValueError as exc:  # no chat template
        raise ModelError(f"cannot render the chat prompt: {exc}") from None
    if not isinstance(text, str):
        raise ModelError("the tokenizer's chat template did not render to text")
    return text


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; the template already holds any special tokens."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError(
            f"{type(tokenizer).__name__} gives no character offsets; patchdb needs a fast tokenizer"
        ) from None
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def blank_line_offset(text: str, trial: str) -> int:
    """Character index in `text` of the blank line before "Trial 1" in the (last) trial turn."""
    where = text.rfind(trial)
    if where < 0:
        raise ModelError("the chat template changed the trial text; cannot find it in the prompt")
    marker = trial.find(TRIAL_MARKER)
    blank = trial.rfind(BLANK_LINE, 0, marker) if marker >= 0 else trial.find(BLANK_LINE)
    if blank < 0:
        raise ModelError(f"the trial text has no blank line before {TRIAL_MARKER!r}")
    return where + blank


def _tokens_near(tokenizer: Any, ids: list[int], offsets: list[tuple[int, int]], char: int) -> str:
    """The tokens around a character position, for an error message."""
    index = next((i for i, (s, e) in enumerate(offsets) if e > char), len(ids) - 1)
    lo, hi = max(0, index - 4), min(len(ids), index + 5)
    return " ".join(repr(tokenizer.decode([t])) for t in ids[lo:hi])


def render_prompt(tokenizer: Any, intro: str, trial: str) -> RenderedPrompt:
    """The three-turn chat (intro, "Ok.", trial) plus generation prompt, tokenised."""
    messages = [
        {"role": "user", "content": intro},
        {"role": "assistant", "content": ASSISTANT_REPLY},
        {"role": "user", "content": trial},
    ]
    text = _chat_text(tokenizer, messages)
    ids, offsets = _encode(tokenizer, text)
    char = blank_line_offset(text, trial)
    for index, (start, end) in enumerate(offsets):
        if start <= char < end:
            return RenderedPrompt(text, ids, index)
    near = _tokens_near(tokenizer, ids, offsets, char + len(BLANK_LINE))
    raise ModelError(
        f"cannot locate the blank line before {TRIAL_MARKER!r} in the token offsets; "
        f"tokens around it: {near}"
    )


def concept_prompt_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids of the single user turn "Tell me about {word}." with generation prompt."""
    text = _chat_text(tokenizer, [{"role": "user", "content": CONCEPT_PROMPT.format(word=word)}])
    ids, _ = _encode(tokenizer, text)
    return ids
