"""Concept vectors: the recipe of docs/science.md on a tiny Llama, storage and reuse, `patchdb vectors`
(compute and --import), and one slow test on the real SmolLM2 through its GGUF alias."""

import hashlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import file_digest
from conftest import run_cli as _run_cli
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tiny_models import save_tiny_llama, tiny_llama, tiny_tokenizer

from patchdb.errors import ModelError
from patchdb.generate.loading import LoadedModel, gguf_cache_dir, load_model, resolve_model
from patchdb.generate.prompt import concept_prompt_ids
from patchdb.generate.vectors import (
    BASELINE_MEAN,
    IMPORTED_RECIPE,
    RECIPE,
    baseline_words,
    ensure_vectors,
    from_blob,
    missing_vectors,
    to_blob,
)
from patchdb.store import ConceptVector, StageRun, Store, open_store

N_LAYERS = 4
OLD_RECIPE = "last-token-minus-baseline-mean/v1"  # patchdb's own 100-word baseline, before
PAPER_BASELINE = [  # the published paper's 100 entries, "Butterflies" once: 99 words
    "Desks", "Jackets", "Gondolas", "Laughter", "Intelligence", "Bicycles", "Chairs",
    "Orchestras", "Sand", "Pottery", "Arrowheads", "Jewelry", "Daffodils", "Plateaus",
    "Estuaries", "Quilts", "Moments", "Bamboo", "Ravines", "Archives", "Hieroglyphs", "Stars",
    "Clay", "Fossils", "Wildlife", "Flour", "Traffic", "Bubbles", "Honey", "Geodes", "Magnets",
    "Ribbons", "Zigzags", "Puzzles", "Tornadoes", "Anthills", "Galaxies", "Poverty", "Diamonds",
    "Universes", "Vinegar", "Nebulae", "Knowledge", "Marble", "Fog", "Rivers", "Scrolls",
    "Silhouettes", "Marbles", "Cakes", "Valleys", "Whispers", "Pendulums", "Towers", "Tables",
    "Glaciers", "Whirlpools", "Jungles", "Wool", "Anger", "Ramparts", "Flowers", "Research",
    "Hammers", "Clouds", "Justice", "Dogs", "Butterflies", "Needles", "Fortresses", "Bonfires",
    "Skyscrapers", "Caravans", "Patience", "Bacon", "Velocities", "Smoke", "Electricity",
    "Sunsets", "Anchors", "Parchments", "Courage", "Statues", "Oxygen", "Time", "Fabric",
    "Pasta", "Snowflakes", "Mountains", "Echoes", "Pianos", "Sanctuaries", "Abysses", "Air",
    "Dewdrops", "Gardens", "Literature", "Rice", "Enigmas",
]
PAPER_BASELINE_SHA256 = "adf530abc9781231c96a6026f6f47ae691585e5c160e726643d50806796cdb9d"


def run_cli(*args: object) -> Result:
    return _run_cli(*(str(a) for a in args))


@pytest.fixture
def tiny() -> LoadedModel:
    return LoadedModel(tiny_llama(n_layers=N_LAYERS), tiny_tokenizer(), "tiny-llama",
                       torch.device("cpu"), torch.float32)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = open_store(str(db_path), create=True)
    yield s
    s.close()


def _rows(store: Store) -> list[ConceptVector]:
    with store.read() as session:
        return list(session.scalars(select(ConceptVector).order_by(ConceptVector.word)))


@torch.no_grad()
def _reference(loaded: LoadedModel, layer: int, word: str) -> torch.Tensor:
    """One unbatched forward pass; hidden_states[layer + 1] is decoder layer `layer`'s output."""
    ids = torch.tensor([concept_prompt_ids(loaded.tokenizer, word)])
    out = loaded.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0, -1].float()


def test_baseline_is_the_papers_99_words() -> None:
    from patchdb.config import NEGATIVE_WORDS, POSITIVE_WORDS

    words = baseline_words()
    assert len(PAPER_BASELINE) == len(set(PAPER_BASELINE)) == 99
    assert words == PAPER_BASELINE
    assert hashlib.sha256("\n".join(words).encode()).hexdigest() == PAPER_BASELINE_SHA256
    assert not {w.lower() for w in words} & {w.lower() for w in POSITIVE_WORDS + NEGATIVE_WORDS}
    assert RECIPE == "last-token-minus-paper-baseline-mean/v2"


def test_recipe_matches_unbatched_reference(store: Store, tiny: LoadedModel) -> None:
    layer = 2
    vectors = ensure_vectors(store, tiny, layer, ["Bread", "Trees", "Dust"])
    assert list(vectors) == ["Bread", "Trees", "Dust"]
    mean = torch.stack([_reference(tiny, layer, w) for w in PAPER_BASELINE]).mean(0)
    for word, vector in vectors.items():
        assert vector.dtype == torch.float32 and vector.shape == (64,)
        torch.testing.assert_close(vector, _reference(tiny, layer, word) - mean, atol=1e-5, rtol=1e-5)
    rows = _rows(store)
    assert [r.word for r in rows] == ["Bread", "Dust", "Trees", BASELINE_MEAN]
    for row in rows:
        assert (row.model, row.layer, row.recipe, row.dimension) == ("tiny-llama", layer, RECIPE, 64)
        assert row.norm == pytest.approx(float(from_blob(row).norm()))
    torch.testing.assert_close(from_blob(rows[-1]), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_blob(rows[0]), vectors["Bread"], atol=0, rtol=0)


def test_old_recipe_vectors_stay_and_are_not_reused(store: Store, tiny: LoadedModel) -> None:
    """A store holding vectors (and a baseline mean) of the old recipe computes the paper
    recipe's beside them: the old rows stay as they were, the sweep gets the new ones."""
    layer = 1

    def old_rows(session: Session) -> None:
        for word, value in (("Bread", 7.0), ("Trees", 7.0), (BASELINE_MEAN, 3.0)):
            vector = torch.full((64,), value)
            session.add(ConceptVector(model="tiny-llama", layer=layer, word=word,
                                      recipe=OLD_RECIPE, dimension=64,
                                      norm=float(vector.norm()), vector=to_blob(vector)))
    store.transact(old_rows)
    vectors = ensure_vectors(store, tiny, layer, ["Bread", "Trees"])
    mean = torch.stack([_reference(tiny, layer, w) for w in PAPER_BASELINE]).mean(0)
    for word in ("Bread", "Trees"):
        torch.testing.assert_close(vectors[word], _reference(tiny, layer, word) - mean,
                                   atol=1e-5, rtol=1e-5)
    rows = {(r.word, r.recipe): from_blob(r) for r in _rows(store)}
    assert sorted(rows) == sorted((w, recipe) for w in ("Bread", "Trees", BASELINE_MEAN)
                                  for recipe in (OLD_RECIPE, RECIPE))
    assert torch.equal(rows[("Bread", OLD_RECIPE)], torch.full((64,), 7.0))
    assert torch.equal(rows[(BASELINE_MEAN, OLD_RECIPE)], torch.full((64,), 3.0))
    assert missing_vectors(store, "tiny-llama", layer, ["Bread", "Trees", "Milk"]) == ["Milk"]


def test_last_layer_and_batch_independence(store: Store, tiny: LoadedModel) -> None:
    # the last layer's output is before the final norm, unlike hidden_states[-1]
    alone = ensure_vectors(store, tiny, N_LAYERS - 1, ["Bread"])["Bread"]
    assert torch.isfinite(alone).all()
    with store.read() as session:
        mean = from_blob(session.scalars(select(ConceptVector).where(
            ConceptVector.word == BASELINE_MEAN)).one())
    captured = []
    handle = tiny.model.model.layers[N_LAYERS - 1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0, -1]))
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([concept_prompt_ids(tiny.tokenizer, "Bread")]))
    handle.remove()
    torch.testing.assert_close(alone, captured[0] - mean, atol=1e-5, rtol=1e-5)


def test_stored_vectors_are_reused(store: Store, tiny: LoadedModel) -> None:
    first = ensure_vectors(store, tiny, 1, ["Bread", "Trees"])
    with torch.no_grad():  # change the model: a reused vector cannot change with it
        for p in tiny.model.parameters():
            p.mul_(1.5)
    again = ensure_vectors(store, tiny, 1, ["Trees", "Bread"])
    assert torch.equal(again["Bread"], first["Bread"]) and torch.equal(again["Trees"], first["Trees"])
    assert len(_rows(store)) == 3
    # a new word uses the stored baseline mean: one new row, not a new mean
    ensure_vectors(store, tiny, 1, ["Milk"])
    assert [r.word for r in _rows(store)] == ["Bread", "Milk", "Trees", BASELINE_MEAN]


def test_two_writers_never_duplicate(db_path: Path) -> None:
    """Two writers, each with its own copy of the model (as two processes would have)."""
    open_store(str(db_path), create=True).close()
    stores = [open_store(str(db_path)) for _ in range(2)]
    models = [LoadedModel(tiny_llama(n_layers=N_LAYERS), tiny_tokenizer(), "tiny-llama",
                          torch.device("cpu"), torch.float32) for _ in range(2)]
    results: list[dict[str, torch.Tensor]] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        results.append(ensure_vectors(stores[i], models[i], 2, ["Bread", "Trees"]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert all(torch.equal(results[0][w], results[1][w]) for w in ("Bread", "Trees"))
    with stores[0].read() as session:
        assert session.scalar(select(func.count()).select_from(ConceptVector)) == 3
    for s in stores:
        s.close()


def test_layer_outside_the_model(store: Store, tiny: LoadedModel) -> None:
    with pytest.raises(ModelError, match=r"^concept vector layer 4 is outside the model's 4 "
                                         r"decoder layers \(valid range 0-3\)$"):
        ensure_vectors(store, tiny, N_LAYERS, ["Bread"])
    assert _rows(store) == []


def _sweep_config(tmp_path: Path) -> Path:
    model = save_tiny_llama(tmp_path / "tiny-model", n_layers=N_LAYERS)
    config = tmp_path / "sweep.toml"
    config.write_text(
        "[sweep]\n"
        'name = "tiny"\n'
        f'model = "{model}"\n'
        'dtype = "float32"\n'
        "steer_layer = 1\n"
        'patch_layers = "2-3"\n'
        'positive_words = ["Bread", "Trees"]\n'
        'negative_words = ["Dust"]\n'
    )
    return config


def test_cli_computes_then_reuses(tmp_path: Path, db_path: Path) -> None:
    config = _sweep_config(tmp_path)
    assert run_cli("init", "--config", config, "--db", db_path).exit_code == 0
    first = run_cli("vectors", "--db", db_path, "--device", "cpu")
    assert first.exit_code == 0, first.output
    lines = first.stdout.splitlines()  # the model-load lines go to stderr
    assert lines[0] == f"Concept vectors for {(tmp_path / 'tiny-model').resolve()} at layer 1 ({RECIPE}):"
    assert [line.split()[0] for line in lines[1:4]] == ["Bread", "Trees", "Dust"]
    assert all(line.endswith("computed now") for line in lines[1:4])
    assert lines[-1] == "Computed 3, reused 0."
    second = run_cli("vectors", "--db", db_path, "--words", "Trees")
    assert second.exit_code == 0
    assert second.stdout.splitlines()[1].endswith("stored")
    assert second.stdout.splitlines()[-1] == "Computed 0, reused 1."
    with open_store(str(db_path)).read() as session:
        runs = session.scalars(select(StageRun).order_by(StageRun.id)).all()
        assert [(r.stage, r.status) for r in runs] == [("vectors", "finished")] * 2
        assert runs[0].sweep_id is not None
        assert session.scalar(select(func.count()).select_from(ConceptVector)) == 4


def test_cli_bad_layer_is_one_line(tmp_path: Path, db_path: Path) -> None:
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    result = run_cli("vectors", "--db", db_path, "--layer", "7")
    assert result.exit_code == 1
    # stderr: the model-load lines (the layer count is the model's), then the one error line
    assert result.stdout == ""
    assert [line for line in result.stderr.splitlines() if not line.startswith("Load")] == [
        "Error: concept vector layer 7 is outside the model's 4 decoder layers (valid range 0-3)"]


def test_cli_import(tmp_path: Path, db_path: Path, tiny: LoadedModel) -> None:
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    mine = {"Bread": torch.full((64,), 0.5), "Dust": torch.arange(64.0).unsqueeze(0)}
    torch.save(mine, tmp_path / "mine.pt")
    result = run_cli("vectors", "--db", db_path, "--import", tmp_path / "mine.pt")
    assert result.exit_code == 0, result.output
    model_id = str((tmp_path / "tiny-model").resolve())
    assert result.output == (
        f"Imported 2 concept vectors from {tmp_path / 'mine.pt'} for {model_id} at layer 1 (2 new).\n"
    )
    rows = _rows(open_store(str(db_path)))
    assert [(r.word, r.recipe, r.layer, r.model) for r in rows] == [
        ("Bread", IMPORTED_RECIPE, 1, model_id), ("Dust", IMPORTED_RECIPE, 1, model_id)]
    assert torch.equal(from_blob(rows[1]), torch.arange(64.0))
    # importing the same file again adds nothing
    again = run_cli("vectors", "--db", db_path, "--import", tmp_path / "mine.pt")
    assert again.output.endswith("(0 new).\n")
    # an imported vector is the one generation gets
    loaded = load_model(model_id)
    got = ensure_vectors(open_store(str(db_path)), loaded, 1, ["Bread", "Trees"])
    assert torch.equal(got["Bread"], torch.full((64,), 0.5))
    assert got["Trees"].shape == (64,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a torch file", "Error: cannot read {path} as a torch file of tensors: "),
        ({"Bread": "text"}, "Error: {path}: the value for 'Bread' is not a float tensor"),
        ({"Bread": torch.zeros(2, 3)},
         "Error: {path}: the vector for 'Bread' has shape (2, 3); expected (d,)"),
        ({"Bread": torch.zeros(4), "Milk": torch.zeros(5)},
         "Error: {path}: vectors have different dimensions [4, 5]"),
        ({"Bread": torch.tensor([1.0, float("nan")])},
         "Error: {path}: the vector for 'Bread' holds NaN or inf"),
        ([torch.zeros(3)], "Error: {path} must hold a non-empty {{word: tensor}} dict"),
        ({"__baseline_mean__": torch.zeros(3)}, "Error: {path}: '__baseline_mean__' is not a usable word"),
        ({"Bread": torch.zeros(64), "Volcanoes": torch.zeros(64)},
         "Error: {path}: unknown word 'Volcanoes' (sweep words: Bread, Dust, Trees)\n"),
    ],
)
def test_cli_bad_import_changes_nothing(tmp_path: Path, db_path: Path, content: object, message: str) -> None:
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    before = file_digest(db_path)
    result = run_cli("vectors", "--db", db_path, "--import", path)
    assert result.exit_code == 1
    assert result.output.startswith(message.format(path=path))
    assert result.output.count("\n") == 1
    assert file_digest(db_path) == before


def test_cli_words_must_be_the_sweeps(tmp_path: Path, db_path: Path) -> None:
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    before = file_digest(db_path)
    result = run_cli("vectors", "--db", db_path, "--device", "cpu", "--words", "Trees,Nope")
    assert result.exit_code == 1
    assert result.output == "Error: unknown word 'Nope' (sweep words: Bread, Dust, Trees)\n"
    assert file_digest(db_path) == before
    # a file of many unknown words still gives one line of bounded length
    many = {f"Word{i:03d}": torch.zeros(64) for i in range(500)}
    torch.save(many, tmp_path / "many.pt")
    result = run_cli("vectors", "--db", db_path, "--import", tmp_path / "many.pt")
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path / 'many.pt'}: unknown words "
        + ", ".join(f"'Word{i:03d}'" for i in range(10))
        + " and 490 more (sweep words: Bread, Dust, Trees)\n"
    )
    assert file_digest(db_path) == before
    assert _rows(open_store(str(db_path))) == []


def test_cli_without_a_sweep_takes_any_word(tmp_path: Path, db_path: Path) -> None:
    """With --model and --layer and no --sweep no sweep is read, so there are no sweep words
    to hold a word to (vectors are stored by model and layer, not by sweep)."""
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    model = tmp_path / "tiny-model"
    result = run_cli("vectors", "--db", db_path, "--device", "cpu", "--model", model,
                     "--layer", "1", "--words", "Volcanoes")
    assert result.exit_code == 0, result.output
    assert [r.word for r in _rows(open_store(str(db_path)))] == ["Volcanoes", BASELINE_MEAN]
    # naming the sweep brings its words back
    refused = run_cli("vectors", "--db", db_path, "--sweep", "tiny", "--model", model,
                      "--layer", "1", "--words", "Volcanoes")
    assert refused.exit_code == 1
    assert refused.output.startswith("Error: unknown word 'Volcanoes'")


def test_unsafe_pickle_is_refused(tmp_path: Path, db_path: Path) -> None:
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    torch.save({"Bread": torch.zeros(3), "evil": Path("/etc/passwd")}, tmp_path / "evil.pt")
    result = run_cli("vectors", "--db", db_path, "--import", tmp_path / "evil.pt")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot read {tmp_path / 'evil.pt'} as a torch file")


def test_conflicting_import_is_refused(tmp_path: Path, db_path: Path) -> None:
    config = _sweep_config(tmp_path)
    run_cli("init", "--config", config, "--db", db_path)
    torch.save({"Bread": torch.zeros(64)}, tmp_path / "a.pt")
    torch.save({"Dust": torch.ones(64), "Bread": torch.ones(64)}, tmp_path / "b.pt")
    assert run_cli("vectors", "--db", db_path, "--import", tmp_path / "a.pt").exit_code == 0
    result = run_cli("vectors", "--db", db_path, "--import", tmp_path / "b.pt")
    assert result.exit_code == 1
    assert "'Bread' already has a different imported vector" in result.output
    assert [r.word for r in _rows(open_store(str(db_path)))] == ["Bread"]


@pytest.mark.slow
def test_smollm2_alias_loads_from_cache_the_second_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_path: Path, shared_cache_dir: Path
) -> None:
    monkeypatch.setenv("PATCHDB_CACHE_DIR", str(tmp_path / "fresh-cache"))  # force a first conversion
    cache = gguf_cache_dir(Path(resolve_model("smollm2-135m").location))
    assert not cache.exists()
    from patchdb.generate import loading

    conversions: list[Path] = []
    convert = loading._write_gguf_cache

    def counted(gguf: Path, target: Path) -> None:
        conversions.append(gguf)
        convert(gguf, target)

    monkeypatch.setattr(loading, "_write_gguf_cache", counted)
    load_model("smollm2-135m")
    assert len(conversions) == 1, "the first load converts the GGUF"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (cache / name).is_file()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no staging left behind
    written = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    loaded = load_model("smollm2-135m")
    # the second load reads the cache: no conversion, no file of it rewritten
    assert len(conversions) == 1
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == written
    assert loaded.model_id == "smollm2-135m" and loaded.tokenizer.pad_token == "<|im_end|>"
    store = open_store(str(db_path), create=True)
    vector = ensure_vectors(store, loaded, 18, ["Bread"])["Bread"]
    assert vector.shape == (576,) and torch.isfinite(vector).all() and vector.norm() > 0
    assert {r.word for r in _rows(store)} == {"Bread", BASELINE_MEAN}
    store.close()
    shared = shared_cache_dir / "models" / cache.name
    if not shared.exists():  # later slow tests of this session need not convert again
        shared.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(cache, shared)
