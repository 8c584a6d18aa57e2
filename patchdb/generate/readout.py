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
from patchdb.generate.transfer import HostCopy, to_device
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
        self._id_tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def read(self, logits: torch.Tensor) -> list[ReadoutValues]:
        """One readout per row of `logits` (computed in float32)."""
        return self.start(logits).values()

    @torch.inference_mode()
    def start(self, logits: torch.Tensor) -> "PendingReadouts":
        """The readouts of `logits`' rows, computed on their device and copied to the host
        without waiting for the GPU (the refill loop prefills while a decode step runs);
        `values()` of the result waits for them."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        yes, no = self._ids(logits.shape[-1], logits.device)
        p_yes = probs.index_select(-1, yes).sum(-1)
        p_no = probs.index_select(-1, no).sum(-1)
        # 0 log 0 is 0: a token with no mass adds nothing (its logp may be -inf)
        entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(-1)
        top = logits.argmax(-1).to(torch.float64)  # exact: token ids are below 2**53
        table = torch.stack([p_yes.double(), p_no.double(), entropy.double(), top], dim=1)
        return PendingReadouts(table, self._decode)

    def _ids(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (vocab, str(device))
        if key not in self._id_tensors:
            self._id_tensors[key] = (to_device([i for i in self.yes_ids if i < vocab], device),
                                     to_device([i for i in self.no_ids if i < vocab], device))
        return self._id_tensors[key]


class PendingReadouts:
    """Readouts on their way to the host: rows of (P(yes), P(no), entropy, top token)."""

    def __init__(self, table: torch.Tensor, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._table = HostCopy(table)
        self._values: list[ReadoutValues] | None = None

    def values(self) -> list[ReadoutValues]:
        """One ReadoutValues per row (waits for the copy, not for later GPU work)."""
        if self._values is None:
            self._values = [ReadoutValues(y, n, h, self._decode([int(t)]))
                            for y, n, h, t in self._table.get().tolist()]
        return self._values
