"""The logprobs verdict mode: after its reasoning, the judge is asked for the verdict and the
probabilities of YES and NO for its next token decide it, so a verdict is always read.

Both backends build the same conversation: the grader prompt, the judge's reasoning as its
reply, and one more user turn asking for the verdict. It is asked twice, naming the two words
in both orders (VERDICT_REQUESTS), because small judges lean towards whichever word the request
names first (SmolLM2-135M: P(YES) 0.76-0.88 asked "YES or NO", 0.20-0.36 asked "NO or YES", on
the same replies); the two answers' log-odds are averaged, which cancels a constant lean. The
answer is the likelier of YES and NO; P(YES), normalised over the two, is stored.

Which tokens count: a token stands for YES when its text, without surrounding whitespace and
case-folded, is "yes" or the start of it ("y", "ye"), and for NO when it is "no" or "n". The
local backend counts the first token of each spelling of the two words (YES, Yes, yes, NO, No,
no, each with and without a leading space): the whole word for most tokenizers, and the first
piece where a tokenizer splits a spelling (SmolLM2 writes "YES" as "Y" + "ES"); a reply that
starts with that piece can only go on to that word of the two. An API server returns its
twenty likeliest tokens, read by the same rule.
"""

import math
from collections.abc import Iterable
from typing import Any

from patchdb.config import VERDICT_MODES
from patchdb.errors import JudgeError

LAST_WORD, LOGPROBS = VERDICT_MODES
VERDICT_REQUESTS = ("Give your verdict now in one word: YES or NO.",
                    "Give your verdict now in one word: NO or YES.")
TOP_LOGPROBS = 20
SPELLINGS = {True: ("YES", "Yes", "yes"), False: ("NO", "No", "no")}


def token_answer(token: str) -> bool | None:
    """True if the token's text stands for YES, False for NO, None for anything else."""
    text = token.strip().casefold()
    if not text:
        return None
    if "yes".startswith(text):
        return True
    if "no".startswith(text):
        return False
    return None


def verdict_messages(prompt: str, reasoning: str, order: int = 0) -> list[dict[str, str]]:
    """The conversation whose next token carries the verdict; `order` picks the request that
    names YES first (0) or NO first (1)."""
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": reasoning},
        {"role": "user", "content": VERDICT_REQUESTS[order]},
    ]


def balanced_p_yes(answers: Iterable[float | None]) -> float | None:
    """P(YES) from the answers to both orders: the mean of their log-odds (an answer of 0 or 1
    counts as 1e-9 from it). A missing answer leaves the other alone; None when both are."""
    odds = [math.log(p / (1 - p)) for p in
            (min(max(a, 1e-9), 1 - 1e-9) for a in answers if a is not None)]
    if not odds:
        return None
    return 1 / (1 + math.exp(-sum(odds) / len(odds)))


def p_yes_from_top(entries: Iterable[tuple[str, float]]) -> float | None:
    """P(YES) from (token text, logprob) pairs of an API reply; None when neither word is
    among them. A word that is absent has no mass here (it was not in the top twenty)."""
    mass = {True: 0.0, False: 0.0}
    seen: set[str] = set()
    for token, logprob in entries:
        answer = token_answer(token)
        if answer is None or token in seen:
            continue
        seen.add(token)
        mass[answer] += math.exp(logprob)
    if mass[True] + mass[False] == 0.0:
        return None
    return mass[True] / (mass[True] + mass[False])


def verdict_of(p_yes: float | None) -> bool | None:
    """The likelier answer; None when there is no P(YES) or the two are exactly even."""
    if p_yes is None or p_yes == 0.5:
        return None
    return p_yes > 0.5


def answer_token_ids(tokenizer: Any) -> dict[bool, list[int]]:
    """For a transformers tokenizer: the first token of each spelling of YES and of NO."""
    ids: dict[bool, list[int]] = {True: [], False: []}
    for answer, spellings in SPELLINGS.items():
        for spelling in spellings:
            for text in (spelling, " " + spelling):
                pieces = tokenizer.encode(text, add_special_tokens=False)
                if not pieces:
                    continue
                first = pieces[0]
                if token_answer(tokenizer.decode([first])) is answer and first not in ids[answer]:
                    ids[answer].append(first)
    if not ids[True] or not ids[False]:
        raise JudgeError("the judge's tokenizer has no token for YES or for NO, so "
                         "--verdict logprobs cannot read its verdicts; use --verdict last-word")
    return ids
