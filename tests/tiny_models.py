"""Tiny random-init models for tests, built from configs with the committed tokenizer fixture.

Nothing is downloaded: the tokenizer is SmolLM2's, saved under tests/fixtures/tokenizer.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tokenizer"


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama(n_layers: int = 6, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    """A random-init Llama with the fixture tokenizer's vocabulary, in float32 eval mode."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_llama(path: Path, n_layers: int = 6, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny Llama plus the fixture tokenizer as a local model directory."""
    tiny_llama(n_layers, hidden, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
