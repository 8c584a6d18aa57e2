"""A local judge: grader prompts through a transformers model in this process.

Prompts are batched with left padding and decoded greedily, so no network and no key are
needed (the embedded demo judges this way). Greedy decoding is deterministic, so a reply cut
off at max_new_tokens is not retried: it is stored as unparsed, with its raw text.
"""

import asyncio
import time
from typing import Any

from patchdb.judge.client import Reply

HF_MAX_NEW_TOKENS = 96
HF_BATCH = 8


class HfJudge:
    """Runs grader prompts through a local causal LM, `batch_size` prompts at a time."""

    def __init__(
        self, spec: str, dtype: str = "float32", device: str | None = None,
        batch_size: int = HF_BATCH, max_new_tokens: int = HF_MAX_NEW_TOKENS,
    ) -> None:
        from patchdb.generate.loading import default_device, load_model

        device = device or default_device()
        loaded = load_model(spec, dtype, device)
        self.model: Any = loaded.model
        self.tokenizer: Any = loaded.tokenizer
        self.model_id: str = loaded.model_id
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.succeeded = 0
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    async def judge(self, prompts: list[str], slot: int = 0) -> list[Reply]:
        return await asyncio.to_thread(self.generate, prompts)

    def _as_text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            ))
        return prompt

    def generate(self, prompts: list[str]) -> list[Reply]:
        """Greedy replies for a batch of prompts."""
        import torch

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
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
        latency = (time.monotonic() - started) / max(1, len(prompts))
        replies = []
        for tokens, n_prompt in zip(new, prompt_lengths, strict=True):
            stop_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            kept = tokens if stop_at is None else tokens[:stop_at]
            replies.append(Reply(
                text=self.tokenizer.decode(kept, skip_special_tokens=True),
                finish_reason="stop" if stop_at is not None else "length",
                attempts=1,
                prompt_tokens=int(n_prompt),
                completion_tokens=len(kept),
                cost=0.0,
                latency_s=latency,
            ))
        self.succeeded += len(replies)
        return replies

    async def close(self) -> None:
        return None
