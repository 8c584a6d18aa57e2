"""A local judge: grader prompts through a transformers model in this process.

Prompts are batched with left padding and decoded greedily, so no network and no key are
needed (the embedded demo judges this way). Greedy decoding is deterministic, so a reply cut
off at max_new_tokens is not retried: it is stored with its raw text and marked cut off.

With verdict="logprobs" the reasoning (up to max_new_tokens) is followed by the verdict
conversation (logprobs.py), asked in both orders, whose next-token distribution gives P(YES): a
verdict is read from every reply, finished or cut off. The two orders' conversations share all
but their last tokens, so that part runs once and each order adds only its own end.

`abort()` (Ctrl-C, from the run's loop) stops the batch in flight at its next decode step: a
reply that already ended (its end token, or all max_new_tokens) is returned as usual, one still
being written comes back as None and is judged on the next run. The verdict pass runs
P_YES_CHUNK replies at a time and stops between chunks too (after the first); a reply whose
P(YES) was not read is None as well. So a Ctrl-C keeps every finished reply and no decoding
outlives the run; what it cannot cut short is one forward pass (the batch's prefill, or one
verdict chunk's passes).
"""

import asyncio
import threading
import time
from typing import Any

from patchdb.faults import fault_point
from patchdb.judge.client import Reply
from patchdb.judge.logprobs import LOGPROBS, answer_token_ids, verdict_messages

HF_MAX_NEW_TOKENS = 96
HF_BATCH = 8
P_YES_CHUNK = 4  # replies per verdict pass: the longest wait a Ctrl-C has there


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens the two rows share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class HfJudge:
    """Runs grader prompts through a local causal LM, `batch_size` prompts at a time."""

    def __init__(
        self, spec: str, dtype: str = "float32", device: str | None = None,
        batch_size: int = HF_BATCH, max_new_tokens: int = HF_MAX_NEW_TOKENS,
        verdict: str = "last-word",
    ) -> None:
        from patchdb.generate.loading import default_device, forward_arguments, load_model

        device = device or default_device()
        loaded = load_model(spec, dtype, device)
        self.model: Any = loaded.model
        self.tokenizer: Any = loaded.tokenizer
        self.model_id: str = loaded.model_id
        # the forward's cache argument; a pass whose logits are not read asks for the last
        # position's only, where the model can (skipping the vocabulary product elsewhere)
        self._cache_kw, keep = forward_arguments(self.model)
        self._last_logits_only = {} if keep is None else {keep: 1}
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.succeeded = 0
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.verdict = verdict
        self.answer_ids = answer_token_ids(self.tokenizer) if verdict == LOGPROBS else None
        self.steps = 0  # decode steps run, over all batches
        self._abort = threading.Event()

    async def judge(self, prompts: list[str], slot: int = 0) -> list[Reply | None]:
        return await asyncio.to_thread(self.generate, prompts)

    def abort(self) -> None:
        """Stop the batch in flight at its next decode step, and every later one at once."""
        self._abort.set()

    def _stopping(self) -> Any:
        """A stopping criterion that ends every row once abort() was called, checked after each
        decode step (fault point judge.hf_step)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        judge = self

        class Aborted(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                judge.steps += 1
                fault_point("judge.hf_step")
                return torch.full((input_ids.shape[0],), judge._abort.is_set(),
                                  dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Aborted()])

    def _as_text(self, prompt: str) -> str:
        return self._chat([{"role": "user", "content": prompt}])

    def _chat(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the model reads it, ending where the assistant speaks next."""
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True))
        parts = [m["content"] for m in messages]  # a base model: the turns, one per paragraph
        return "\n\n".join(parts) + ("\n\n" if len(parts) > 1 else "")

    def p_yes(self, prompts: list[str], reasonings: list[str]) -> list[float]:
        """P(YES) over YES and NO for the first token of the answer to the verdict request,
        summed over the spellings' tokens, balanced over both orders of the request. The two
        orders' conversations share all but their last few tokens: the batch runs that shared
        part once (left-padded, keeping its cache), then each order's rest from a copy of the
        cache; only the last position's logits are computed."""
        import copy

        import torch
        from transformers import DynamicCache

        assert self.answer_ids is not None
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        ids = [[self.tokenizer(self._chat(verdict_messages(p, r, order)),
                               add_special_tokens=not chat)["input_ids"]
                for p, r in zip(prompts, reasonings, strict=True)] for order in (0, 1)]
        shared = [min(common_prefix(a, b), len(a) - 1, len(b) - 1)
                  for a, b in zip(ids[0], ids[1], strict=True)]
        prefix = self._pad([row[:n] for row, n in zip(ids[0], shared, strict=True)], left=True)
        mask = prefix["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=prefix["input_ids"], attention_mask=mask,
                       position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=True,
                       **{self._cache_kw: cache}, **self._last_logits_only)
        log_odds = []
        for order in (0, 1):  # both orders of the two words; their log-odds are averaged
            rest = self._pad([row[n:] for row, n in zip(ids[order], shared, strict=True)],
                             left=False)
            lengths = rest["attention_mask"].sum(dim=1)
            positions = mask.sum(dim=1, keepdim=True) + torch.arange(
                rest["input_ids"].shape[1], device=self.device)
            with torch.no_grad():
                logits = self.model(
                    input_ids=rest["input_ids"],
                    attention_mask=torch.cat([mask, rest["attention_mask"]], dim=1),
                    position_ids=positions, use_cache=True,
                    **{self._cache_kw: copy.deepcopy(cache) if order == 0 else cache},
                ).logits
            last = logits[torch.arange(logits.shape[0]), lengths - 1].float()
            log_odds.append(torch.logsumexp(last[:, self.answer_ids[True]], dim=1)
                            - torch.logsumexp(last[:, self.answer_ids[False]], dim=1))
        return torch.sigmoid((log_odds[0] + log_odds[1]) / 2).tolist()

    def _pad(self, rows: list[list[int]], left: bool) -> dict[str, Any]:
        """Token id rows as one padded batch on the device: input_ids and attention_mask."""
        import torch

        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, at] = torch.tensor(row, dtype=torch.long)
            mask[i, at] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def generate(self, prompts: list[str]) -> list[Reply | None]:
        """Greedy replies for a batch of prompts; None for a reply abort() stopped midway."""
        import torch

        if self._abort.is_set():
            return [None] * len(prompts)
        started = time.monotonic()
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(
            [self._as_text(p) for p in prompts], return_tensors="pt", padding=True,
            add_special_tokens=not chat,
        ).to(self.device)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        with torch.no_grad():
            out = self.model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=self._stopping(),
            )
        fault_point("judge.hf_generated")
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
        replies: list[Reply | None] = []
        for tokens, n_prompt in zip(new, prompt_lengths, strict=True):
            stop_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            if stop_at is None and len(tokens) < self.max_new_tokens:
                replies.append(None)  # abort() stopped it midway: not a reply, not cut off
                continue
            kept = tokens if stop_at is None else tokens[:stop_at]
            replies.append(Reply(
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                finish_reason="stop" if stop_at is not None else "length",
                attempts=1,
                prompt_tokens=int(n_prompt),
                completion_tokens=len(kept),
                cost=0.0,
            ))
        if self.answer_ids is not None:
            self._read_p_yes(prompts, replies)
        done = [r for r in replies if r is not None]
        latency = (time.monotonic() - started) / max(1, len(prompts))
        for reply in done:
            reply.latency_s = latency
        self.succeeded += len(done)
        return replies

    def _read_p_yes(self, prompts: list[str], replies: list[Reply | None]) -> None:
        """Set each finished reply's P(YES), P_YES_CHUNK replies a pass; after abort(), the
        replies of the chunks not yet read become None (the verdict is part of the judgment)."""
        done = [i for i, r in enumerate(replies) if r is not None]
        for start in range(0, len(done), P_YES_CHUNK):
            chunk = done[start:start + P_YES_CHUNK]
            if start and self._abort.is_set():  # the first chunk is read: its replies ended
                for i in chunk:
                    replies[i] = None
                continue
            texts = [(replies[i] or Reply()).text or "" for i in chunk]
            for i, p in zip(chunk, self.p_yes([prompts[i] for i in chunk], texts), strict=True):
                reply = replies[i]
                assert reply is not None
                reply.p_yes = p

    async def close(self) -> None:
        return None
