"""The first-token readout: what the model's next-token distribution after a unit's prefill
says, with no sampling and no judge.

P(yes) is the probability mass of the YES-like first tokens, P(no) that of the NO-like ones,
both over the model's own distribution (the softmax of its logits at temperature 1, before any
top-k or top-p cut), and the entropy is that distribution's, in nats. Which tokens count is the
logprobs verdict mode's rule (patchdb.judge.logprobs.answer_token_ids): one rule in one place.
"""

from collections.abc import Callable
from typing import Any

import torch

from patchdb.errors import JudgeError, ModelError
from patchdb.judge.logprobs import answer_token_ids
from patchdb.store.readouts import ReadoutValues


class FirstTokenReader:
    """Turns last-position logits [rows, vocab] into one ReadoutValues per row."""

    def __init__(self, tokenizer: Any) -> None:
        try:
            ids = answer_token_ids(tokenizer)
        except JudgeError:
            raise ModelError("the model's tokenizer has no token for YES or for NO, so the "
                             "first-token readout cannot be read") from None
        self.yes_ids = ids[True]
        self.no_ids = ids[False]
        self._decode: Callable[[list[int]], str] = lambda t: str(tokenizer.decode(t))

    @torch.inference_mode()
    def read(self, logits: torch.Tensor) -> list[ReadoutValues]:
        """One readout per row of `logits` (computed in float32)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        vocab = logits.shape[-1]
        yes = torch.tensor([i for i in self.yes_ids if i < vocab], device=logits.device,
                           dtype=torch.long)
        no = torch.tensor([i for i in self.no_ids if i < vocab], device=logits.device,
                          dtype=torch.long)
        p_yes = probs.index_select(-1, yes).sum(-1)
        p_no = probs.index_select(-1, no).sum(-1)
        # 0 log 0 is 0: a token with no mass adds nothing (its logp may be -inf)
        entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(-1)
        top = logits.argmax(-1)
        return [
            ReadoutValues(float(y), float(n), float(h), self._decode([int(t)]))
            for y, n, h, t in zip(p_yes.tolist(), p_no.tolist(), entropy.tolist(),
                                  top.tolist(), strict=True)
        ]
