"""Bad inputs to the stage commands: one `Error: ...` line, a non-zero exit, no traceback, and
a store that is exactly as it was (its file bytes, WAL included)."""

import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import file_digest, run_cli
from judge_server import FaultServer, fault_server, make_store
from tiny_models import save_tiny_llama

BAD_UTF8 = b"name = \"caf\xe9\"\n\xff\xfe not text\n"


def assert_one_error(result: Result, fragment: str, exit_code: int = 1) -> str:
    """The output ends in exactly one `Error:` line holding `fragment`; returns that line."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert fragment in errors[0], errors[0]
    return errors[0]


def settle(db: Path) -> Path:
    """Checkpoint the WAL so that a digest taken now is the store's resting state."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", n_layers=6)


@pytest.fixture
def empty_store(tmp_path: Path, model_dir: Path) -> Path:
    """A sweep of a 6-layer model with patch layers 2-9 (so 6-9 lie outside it), no rollouts."""
    db = tmp_path / "empty.sqlite"
    make_store(db, last=0, model=str(model_dir), patch_layers="2-9")
    return settle(db)


@pytest.fixture
def full_store(tmp_path: Path) -> Path:
    db = tmp_path / "full.sqlite"
    make_store(db)
    return settle(db)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("args", "fragment", "code"), [
    (["--layers", "1"], "layer 1 is not a patch layer of sweep 'small' (patch layers: 2-9)", 1),
    (["--layers", "99"], "layer 99 is not a patch layer of sweep 'small'", 1),
    (["--layers", "4-"], "invalid range '4-'", 1),
    (["--layers", "9-4"], "ends before it starts", 1),
    (["--layers", "2,x"], "cannot read 'x'", 1),
    (["--layers", "\u0664\u0660-\u0664\u0664"], "cannot read '\u0664\u0660-\u0664\u0664'", 1),  # Arabic-Indic
    (["--layers", "\uff12-\uff14"], "cannot read '\uff12-\uff14'", 1),  # fullwidth 2-4
    (["--words", "Nope"], "unknown word 'Nope' (sweep words: Bread, Dust, Trees)", 1),
    (["--experiments", "nope"], "unknown experiment 'nope' in sweep 'small'", 1),
    (["--sweep", "nope"], "no sweep named 'nope' in the store (known: small)", 1),
    (["--model", "/no/such/model"], "model path not found: /no/such/model", 1),
    (["--model", "/no/such/model.gguf"], "model path not found: /no/such/model.gguf", 1),
    (["--samples", "9"], "--samples", 1),
    (["--shard", "3/2"], "--shard", 1),
])
def test_generate_refuses_bad_options(empty_store: Path, args: list[str], fragment: str,
                                      code: int) -> None:
    before = file_digest(empty_store)
    assert_one_error(run_cli("generate", "--db", empty_store, "--quiet", *args), fragment, code)
    assert file_digest(empty_store) == before


@pytest.mark.parametrize(("args", "fragment"), [
    (["--words", "Nope"], "unknown word 'Nope' (sweep words: Bread, Dust, Trees)"),
    (["--words", "Bread,Nope,Zilch"], "unknown words 'Nope', 'Zilch' (sweep words: Bread, Dust, Trees)"),
    (["--sweep", "small", "--layer", "1", "--words", "Nope"], "unknown word 'Nope'"),
    (["--words", "bread"], "unknown word 'bread'"),  # words are matched exactly, as generate does
])
def test_vectors_refuses_words_not_in_the_sweep(empty_store: Path, args: list[str],
                                                fragment: str) -> None:
    before = file_digest(empty_store)
    line = assert_one_error(run_cli("vectors", "--db", empty_store, "--device", "cpu", *args),
                            fragment)
    assert len(line) < 120, line
    assert file_digest(empty_store) == before


def test_vectors_import_refuses_words_not_in_the_sweep(empty_store: Path, tmp_path: Path) -> None:
    path = tmp_path / "mine.pt"
    torch.save({"Bread": torch.zeros(64), "Nope": torch.ones(64)}, path)
    before = file_digest(empty_store)
    assert_one_error(run_cli("vectors", "--db", empty_store, "--import", path),
                     f"{path}: unknown word 'Nope' (sweep words: Bread, Dust, Trees)")
    assert file_digest(empty_store) == before


def test_a_layer_outside_the_model_is_refused_before_writing(empty_store: Path) -> None:
    before = file_digest(empty_store)
    line = assert_one_error(run_cli("generate", "--db", empty_store, "--quiet", "--layers", "6"),
                            "6")
    assert "layer" in line
    assert file_digest(empty_store) == before


@pytest.mark.parametrize(("args", "fragment", "code"), [
    (["--experiments", "nope"], "unknown experiment 'nope' in sweep 'small'", 1),
    (["--layers", "99"], "layer 99 is not a patch layer of sweep 'small'", 1),
    (["--layers", "2-3:0"], "step in '2-3:0' must be at least 1", 1),
    (["--graders", "vibes"], "vibes", 1),
    (["--sweep", "nope"], "no sweep named 'nope'", 1),
    (["--max-cost", "nan"], "'nan' is not a finite number", 1),  # NaN was no limit at all
    (["--price-in", "inf", "--price-out", "1", "--dry-run"], "'inf' is not a finite number", 1),
    (["--timeout", "nan"], "'nan' is not a finite number", 1),
])
def test_judge_refuses_bad_options(full_store: Path, args: list[str], fragment: str, code: int,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-test")
    before = file_digest(full_store)
    assert_one_error(run_cli("judge", "--db", full_store, "--base-url",
                             f"http://127.0.0.1:{closed_port()}/v1", *args), fragment, code)
    assert file_digest(full_store) == before


def test_judge_without_a_key(full_store: Path) -> None:
    before = file_digest(full_store)
    assert_one_error(run_cli("judge", "--db", full_store), "no judge API key")
    assert file_digest(full_store) == before


@pytest.fixture
def rejecting_server() -> Iterator[FaultServer]:
    with fault_server() as srv:
        yield srv


def data_rows(db: Path) -> list[tuple]:
    """Rollouts and judgments: what a failed stage must leave alone (it may log its run)."""
    with sqlite3.connect(db) as conn:
        return (conn.execute("SELECT * FROM rollouts ORDER BY id").fetchall()
                + conn.execute("SELECT * FROM judgments ORDER BY id").fetchall())


def test_an_invalid_key_stops_at_the_first_401(tmp_path: Path, rejecting_server: FaultServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "store.sqlite"
    make_store(db, "x {i} [[fault=401]]")
    before = data_rows(db)
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-wrong")
    result = run_cli("judge", "--db", db, "--base-url", rejecting_server.base_url,
                     "--concurrency", "1", "--no-progress")
    assert_one_error(result, "rejected the API key (401 Unauthorized)")
    assert "sk-wrong" not in result.output
    assert data_rows(db) == before
    assert rejecting_server.stats.requests == 1  # a bad key is not retried
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT stage, status FROM stage_runs").fetchall() == [
            ("judge", "failed")]


def test_an_unreachable_base_url(full_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-test")
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    before = data_rows(full_store)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    result = run_cli("judge", "--db", full_store, "--base-url", url, "--max-attempts", "2",
                     "--no-progress")
    assert_one_error(result, f"cannot reach the judge API at {url}")
    assert data_rows(full_store) == before


@pytest.mark.parametrize(("content", "fragment"), [
    (b'detection = "Did it notice {word}?"\n', "lacks the placeholder {response}"),
    (b'coherence = "{response} {answer}"\n', "unknown placeholder {answer}"),
    (b"coherence = [unclosed\n", "prompts.toml"),
    (BAD_UTF8, "prompts.toml"),
])
def test_judge_prompts_file_that_cannot_be_used(full_store: Path, tmp_path: Path, content: bytes,
                                                fragment: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-test")
    prompts = tmp_path / "prompts.toml"
    prompts.write_bytes(content)
    before = file_digest(full_store)
    result = run_cli("judge", "--db", full_store, "--prompts", prompts, "--base-url",
                     f"http://127.0.0.1:{closed_port()}/v1")
    assert_one_error(result, fragment)
    assert file_digest(full_store) == before


@pytest.mark.parametrize(("args", "fragment"), [
    (["--experiments", "nope"], "unknown experiment 'nope'"),
    (["--judge-config", "99"], "99"),
    (["--sweep", "nope"], "no sweep named 'nope'"),
])
def test_report_refuses_bad_options(full_store: Path, args: list[str], fragment: str) -> None:
    before = file_digest(full_store)
    assert_one_error(run_cli("report", "--db", full_store, *args), fragment)
    assert file_digest(full_store) == before


def test_a_config_that_is_not_utf8(tmp_path: Path, db_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_bytes(b"[sweep]\n" + BAD_UTF8)
    assert_one_error(run_cli("init", "--config", config, "--db", db_path), str(config))
    assert not db_path.exists()


# --- a store that is not a healthy patchdb store, under every stage command -------------------

def corrupt(db: Path) -> str:
    data = bytearray(db.read_bytes())
    data[100:4096] = bytes(range(256)) * 15 + bytes(range(196))  # page 1's b-tree is garbage
    db.write_bytes(bytes(data))
    return "corrupt"


def truncate(db: Path) -> str:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2 + 100])
    return "truncated"


def newer(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    settle(db)
    return "newer patchdb"


STAGES = {
    "generate": ["generate", "--quiet"],
    "judge": ["judge", "--base-url", "http://127.0.0.1:9/v1"],
    "report": ["report"],
    "export": ["report", "--export-json", "--out", "exported"],
    "vectors": ["vectors", "--words", "Bread"],
    "import-json": ["import-json", "tree"],
    "merge": ["merge", "other.sqlite"],
}


@pytest.mark.parametrize("damage", [corrupt, truncate, newer])
def test_every_stage_refuses_a_damaged_store(tmp_path: Path, damage: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-test")
    db = tmp_path / "store.sqlite"
    make_store(db)
    make_store(tmp_path / "other.sqlite")
    (tmp_path / "tree" / "unsteered_to_steered" / "layer_40").mkdir(parents=True)
    (tmp_path / "tree" / "unsteered_to_steered" / "layer_40" / "rollouts.json").write_text(
        '{"Bread": ["an answer"]}')
    settle(db)
    assert callable(damage)
    fragment = damage(db)
    before = file_digest(db)
    for name, args in STAGES.items():
        result = run_cli(*args, "--db", db)
        line = assert_one_error(result, str(db))
        assert fragment in line or (fragment == "corrupt" and "not a SQLite database" in line), name
        assert file_digest(db) == before, name
    assert not (tmp_path / "exported").exists()


# --- the JSON importer: wrong shapes and bytes that are not text ------------------------------

@pytest.mark.parametrize(("content", "fragment"), [
    (b'["an answer"]', "expected an object {key: ...}, got list"),
    (b'{"Bread": "an answer"}', "key 'Bread' must hold a list of answer strings"),
    (b'{"Bread": [1, 2]}', "key 'Bread' must hold a list of answer strings"),
    (b'{"Bread": [["nested"]]}', "key 'Bread' must hold a list of answer strings"),
    (b'{"Dust_to_Bread": ["a"]}', "key 'Dust_to_Bread' has an invalid word 'Dust_to_Bread'"),
    (b'{"": ["a"]}', "key '' has an invalid word ''"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b'{"Bread": ["caf\xe9"]}', "not UTF-8 text"),
    (b"", "invalid JSON (Expecting value at line 1 column 1)"),
    (b"{" * 100_000,
     "invalid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
])
def test_import_of_a_wrong_shape_names_the_file(tmp_path: Path, db_path: Path, content: bytes,
                                                fragment: str) -> None:
    assert run_cli("init", "--db", db_path).exit_code == 0
    settle(db_path)
    before = file_digest(db_path)
    path = tmp_path / "tree" / "unsteered_to_steered" / "layer_40" / "rollouts.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    line = assert_one_error(run_cli("import-json", tmp_path / "tree", "--db", db_path), fragment)
    assert line.startswith(f"Error: {path}: ") and line.endswith(fragment), line
    assert file_digest(db_path) == before


# --- the disk fills up during a write ---------------------------------------------------------

SMALL_FS_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[tuple[Path, int | None]]:
    """(folder, file size limit): a 2 MiB tmpfs when we may mount one (root), else a plain
    folder and a limit for RLIMIT_FSIZE in the child process."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs",
                                  str(folder)], capture_output=True).returncode == 0
    try:
        yield folder, None if mounted else SMALL_FS_BYTES
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def run_limited(limit: int | None, *args: object) -> subprocess.CompletedProcess[str]:
    """`python -m patchdb ARGS` with file writes capped at `limit` bytes (None: no cap)."""

    def cap() -> None:
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "patchdb", *map(str, args)], text=True,
                          capture_output=True, timeout=120, preexec_fn=cap)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def big_tree(root: Path, megabytes: int) -> Path:
    answers = [f"{i} " + "an answer that goes on and on. " * 320 for i in range(megabytes * 100)]
    path = root / "unsteered_to_steered" / "layer_40" / "rollouts.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"Bread": answers}))
    return root


def test_a_full_disk_during_an_import_keeps_nothing_of_it(
        tmp_path: Path, small_fs: tuple[Path, int | None]) -> None:
    folder, limit = small_fs
    db = folder / "store.sqlite"
    assert run_cli("init", "--db", db).exit_code == 0
    settle(db)
    limit = None if limit is None else db.stat().st_size + 512 * 1024
    line = one_error_line(run_limited(limit, "import-json", big_tree(tmp_path / "tree", 4),
                                      "--db", db))
    assert str(db) in line
    assert "disk full" in line or "disk I/O error" in line, line
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM rollouts").fetchall() == [(0,)]
        assert conn.execute("SELECT count(*) FROM sweeps").fetchall() == [(1,)]
    assert run_cli("status", "--db", db).exit_code == 0  # the store still opens and reads


def test_a_full_disk_during_an_export_is_one_line(
        tmp_path: Path, small_fs: tuple[Path, int | None]) -> None:
    folder, limit = small_fs
    db = tmp_path / "store.sqlite"
    result = run_cli("import-json", big_tree(tmp_path / "tree", 3), "--db", db)
    assert result.exit_code == 0, result.output
    settle(db)
    before = file_digest(db)
    line = one_error_line(run_limited(limit, "report", "--db", db, "--export-json",
                                      "--out", folder / "out"))
    assert "No space left on device" in line or "File too large" in line, line
    assert file_digest(db) == before
    leftovers = [p for p in (folder / "out").rglob("*.json")] if (folder / "out").exists() else []
    assert all(json.loads(p.read_text()) is not None for p in leftovers)  # no half-written file
