"""The rendered prompt: `status` shows its hash, and a store whose stored prompt differs from
what this model's tokenizer renders now refuses to generate more (a tiny Llama, real store)."""

import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from tiny_models import save_tiny_llama

ABC_SHA256_12 = "ba7816bf8f01"  # sha256("abc"), the FIPS 180-2 test vector, first 12 hex digits


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prompt-hash")
    model = save_tiny_llama(folder / "tiny-model", n_layers=4)
    path = folder / "sweep.toml"
    path.write_text(
        "[sweep]\n"
        'name = "tiny"\n'
        f'model = "{model}"\n'
        'dtype = "float32"\n'
        "steer_layer = 1\n"
        'patch_layers = "2-3"\n'
        "samples = 1\n"
        "max_new_tokens = 2\n"
        "temperature = 0.0\n"
        'positive_words = ["Bread"]\n'
        'negative_words = ["Dust"]\n'
        'experiments = ["unsteered_to_steered"]\n'
    )
    return path


def sql(db: Path, query: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query, args).fetchall()


def test_status_shows_the_prompt_hash(config: Path, db_path: Path) -> None:
    assert run_cli("init", "--config", config, "--db", db_path).exit_code == 0
    before = run_cli("status", "--db", db_path)
    assert before.output.splitlines()[1] == "Prompt: not rendered yet (generate stores it)"
    sql(db_path, "UPDATE sweeps SET prompt_text = 'abc'")
    after = run_cli("status", "--db", db_path)
    assert after.output.splitlines()[1] == f"Prompt: sha256 {ABC_SHA256_12}"
    assert f'"prompt_hash": "{ABC_SHA256_12}"' in run_cli("status", "--db", db_path,
                                                          "--json").output


def test_two_stores_of_one_prompt_show_one_hash(config: Path, tmp_path: Path) -> None:
    hashes = []
    for name in ("a.sqlite", "b.sqlite"):
        db = tmp_path / name
        assert run_cli("init", "--config", config, "--db", db).exit_code == 0
        assert run_cli("generate", "--db", db, "--quiet", "--device", "cpu").exit_code == 0
        hashes.append(run_cli("status", "--db", db).output.splitlines()[1])
    assert hashes[0] == hashes[1] and hashes[0].startswith("Prompt: sha256 ")
    assert len(hashes[0].split()[-1]) == 12


@pytest.mark.parametrize("tamper", ["prompt", "injection_start"])
def test_a_store_rendered_differently_refuses_to_generate(
        config: Path, db_path: Path, tamper: str) -> None:
    assert run_cli("init", "--config", config, "--db", db_path).exit_code == 0
    first = run_cli("generate", "--db", db_path, "--quiet", "--device", "cpu", "--layers", "2")
    assert first.exit_code == 0, first.output
    ((start,),) = sql(db_path, "SELECT injection_start FROM sweeps")
    assert isinstance(start, int)
    if tamper == "prompt":  # as if another tokenizer or chat template had rendered it
        sql(db_path, "UPDATE sweeps SET prompt_text = prompt_text || ' '")
        stored = start
    else:
        sql(db_path, "UPDATE sweeps SET injection_start = 999")
        stored = 999
    rollouts = sql(db_path, "SELECT count(*) FROM rollouts")
    prompt = sql(db_path, "SELECT prompt_text, injection_start FROM sweeps")
    result = run_cli("generate", "--db", db_path, "--quiet", "--device", "cpu")
    assert result.exit_code == 1
    assert result.output == (
        f"Error: sweep 'tiny' was generated with a different prompt or injection start "
        f"({stored}, now {start}); this model's tokenizer or chat template differs from the "
        "one used before\n")
    assert sql(db_path, "SELECT count(*) FROM rollouts") == rollouts
    assert sql(db_path, "SELECT prompt_text, injection_start FROM sweeps") == prompt


def test_init_help_says_how_to_reproduce_a_prompt() -> None:
    text = " ".join(run_cli("init", "--help").output.split())
    assert "The default prompt intro (the first user turn) is patchdb's own wording" in text
    assert "put its exact first-turn text in `prompt_intro`" in text


def test_prompt_intro_is_the_first_turn(config: Path, tmp_path: Path) -> None:
    """What the help text promises: the intro in the config is the prompt's first user turn."""
    intro = "These are the exact words of an earlier sweep's first turn."
    custom = tmp_path / "custom.toml"
    custom.write_text(config.read_text() + f'prompt_intro = "{intro}"\n')
    db = tmp_path / "custom.sqlite"
    assert run_cli("init", "--config", custom, "--db", db).exit_code == 0
    assert run_cli("generate", "--db", db, "--quiet", "--device", "cpu").exit_code == 0
    ((text,),) = sql(db, "SELECT prompt_text FROM sweeps")
    assert isinstance(text, str) and text.count(intro) == 1
    assert text.index(intro) < text.index("Ok.") < text.index("Trial 1")
