"""Tiny random-init models for tests, built from configs with the committed tokenizer fixture.

Nothing is downloaded: the tokenizer is SmolLM2's, saved under tests/fixtures/tokenizer.
"""

import atexit
import shutil
import tempfile
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


# (n_layers, hidden, seed) -> a saved model directory and the torch RNG state its build left
_SAVED: dict[tuple[int, int, int], tuple[Path, torch.Tensor]] = {}


def save_tiny_llama(path: Path, n_layers: int = 6, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny Llama plus the fixture tokenizer as a local model directory.

    The model is a function of its arguments, so each process builds and saves it once (about
    2 s) and copies those files afterwards; the torch RNG is left as a fresh build leaves it."""
    key = (n_layers, hidden, seed)
    if key not in _SAVED or not _SAVED[key][0].is_dir():
        built = Path(tempfile.mkdtemp(prefix="patchdb-tiny-llama-"))
        atexit.register(shutil.rmtree, built, ignore_errors=True)
        tiny_llama(n_layers, hidden, seed).save_pretrained(built)
        tiny_tokenizer().save_pretrained(built)
        _SAVED[key] = (built, torch.get_rng_state())
    built, rng = _SAVED[key]
    shutil.copytree(built, path, dirs_exist_ok=True)
    torch.set_rng_state(rng)
    return path
