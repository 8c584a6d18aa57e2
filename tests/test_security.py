"""Security: keys stay secret, SQL is parameterised, tensors load without pickle code, and
names from the store never steer a file outside its folder."""

import ast
import json
import os
import pickle
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import file_digest, run_cli
from judge_server import completion_body, make_store
from tiny_models import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "sk-sentinel-5e1f0c7a9b3d2468"
URL_SECRET = "pw-in-url-93b1c4e7"


class EchoingServer:
    """A chat-completions server that repeats the caller's Authorization header in its error
    bodies, as some real providers do: 500 for the first `fail_first` requests, then 401 once
    `reject_after` requests were answered."""

    def __init__(self, fail_first: int, reject_after: int) -> None:
        self.requests = 0
        self.auth: set[str] = set()
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                auth = self.headers.get("Authorization", "")
                with lock:
                    server.requests += 1
                    n = server.requests
                    server.auth.add(auth)
                if n <= fail_first or n > reject_after:
                    status = 500 if n <= fail_first else 401
                    body = {"error": {"message": f"Incorrect API key provided: {auth}"}}
                else:
                    status, body = 200, completion_body("Fine. YES")
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]


@pytest.fixture
def echoing() -> Iterator[EchoingServer]:
    srv = EchoingServer(fail_first=4, reject_after=20)
    threading.Thread(target=srv.httpd.serve_forever, daemon=True).start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def secrets_in(path: Path) -> list[str]:
    data = path.read_bytes()
    return [s for s in (SENTINEL, SENTINEL[:14], SENTINEL[-12:], URL_SECRET) if s.encode() in data]


def test_an_api_key_is_never_stored_printed_or_logged(tmp_path: Path, echoing: EchoingServer) -> None:
    db = tmp_path / "store.sqlite"
    make_store(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_JUDGE")}
    env.update(PATCHDB_JUDGE_API_KEY=SENTINEL, PATCHDB_JUDGE_BACKOFF="0.01",
               OPENROUTER_API_KEY=SENTINEL, OPENAI_API_KEY=SENTINEL)
    url = f"http://127.0.0.1:{echoing.port}/v1"
    judge = subprocess.run(
        [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--base-url", url,
         "--concurrency", "1", "--max-attempts", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120)
    assert judge.returncode == 1, judge.stdout + judge.stderr
    assert "Error: the judge API rejected the API key (401" in judge.stderr
    assert f"Bearer {SENTINEL}" in echoing.auth  # the key was sent, and echoed back to us
    with sqlite3.connect(db) as conn:
        errors = [e for (e,) in conn.execute("SELECT error FROM judgments WHERE error IS NOT NULL")]
        arguments = [a for (a,) in conn.execute("SELECT arguments FROM stage_runs")]
    assert errors and all("Incorrect API key provided" in e for e in errors)  # stored, redacted
    outputs = judge.stdout + judge.stderr
    for command in (["status"], ["report", "--export-json", "--out", "out"], ["report", "--html"]):
        result = run_cli(*command, "--db", db)
        assert result.exit_code == 0, result.output
        outputs += result.output
    for secret in (SENTINEL, SENTINEL[:14], SENTINEL[-12:], URL_SECRET):
        assert secret not in outputs
        assert not any(secret in a for a in arguments)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert db.with_name("store.sqlite-wal") in files or db in files
    assert {str(p): secrets_in(p) for p in files if secrets_in(p)} == {}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_credentials_in_a_base_url_are_not_printed(db_path: Path) -> None:
    make_store(db_path)
    url = f"http://judge:{URL_SECRET}@127.0.0.1:{closed_port()}/v1"
    result = run_cli("judge", "--db", db_path, "--base-url", url, "--max-attempts", "1")
    assert result.exit_code == 1 and "Error: cannot reach the judge API" in result.output
    with sqlite3.connect(db_path) as conn:
        arguments = [a for (a,) in conn.execute("SELECT arguments FROM stage_runs")]
    assert arguments and not any(URL_SECRET in a for a in arguments)
    assert not secrets_in(db_path)  # stage_runs.error holds the message, password hidden
    assert URL_SECRET not in result.output and "http://judge:***@127.0.0.1" in result.output


def test_batch_judging_never_stores_prints_or_logs_the_key(tmp_path: Path) -> None:
    """The same checks over `judge --batch`: an upload refused with the key echoed back, then
    a batch uploaded, created, polled and collected."""
    from batch_server import BatchState, batch_server

    db = tmp_path / "store.sqlite"
    make_store(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_JUDGE")}
    env.update(PATCHDB_JUDGE_API_KEY=SENTINEL, OPENROUTER_API_KEY=SENTINEL,
               OPENAI_API_KEY=SENTINEL, PATCHDB_JUDGE_BATCH_POLL="0.01")
    state = BatchState(echo_key_on_upload=True)
    outputs = ""
    with batch_server(state) as server:
        for expected in (1, 0):
            run = subprocess.run(
                [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--batch",
                 "--base-url", server.base_url, "--no-progress"],
                env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == expected, run.stdout + run.stderr
            outputs += run.stdout + run.stderr
            state.echo_key_on_upload = False
    assert state.auth_headers == {f"Bearer {SENTINEL}"} and len(state.billed) == 64
    for command in (["status"], ["report", "--export-json", "--out", "out"]):
        result = run_cli(*command, "--db", db)
        assert result.exit_code == 0, result.output
        outputs += result.output
    for secret in (SENTINEL, SENTINEL[:14], SENTINEL[-12:]):
        assert secret not in outputs
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {str(p): secrets_in(p) for p in files if secrets_in(p)} == {}


# --- one redaction rule: secrets go, counts of tokens stay ---------------------------------------

def test_secret_names_are_known_by_their_parts_and_token_counts_are_not_secrets() -> None:
    from patchdb.redact import is_secret_name

    secrets = ["api_key", "OPENROUTER_API_KEY", "hf_token", "auth_token", "token", "password",
               "db-password", "client_secret", "apikey", "HF-Token"]
    plain = ["max_new_tokens", "hf_max_new_tokens", "prompt_tokens", "batch_size", "base_url",
             "model", "keys", "monkey", "tokenizer", "passage"]
    assert [n for n in secrets if not is_secret_name(n)] == []
    assert [n for n in plain if is_secret_name(n)] == []


def test_secrets_inside_text_are_hidden() -> None:
    from patchdb.redact import redact_text, scrub

    assert redact_text(f"http://judge:{URL_SECRET}@127.0.0.1:8000/v1") == (
        "http://judge:***@127.0.0.1:8000/v1")
    assert redact_text(f"postgresql+psycopg://u:{URL_SECRET}@db/x failed") == (
        "postgresql+psycopg://u:***@db/x failed")
    # an unescaped "@" in the password: URL parsers take the host after the last one
    assert redact_text(f"https://user:p@{URL_SECRET}@proxy/v1 and http://h/@x") == (
        "https://user:***@proxy/v1 and http://h/@x")
    assert redact_text(f"https://u:{URL_SECRET}@h?q=@x") == "https://u:***@h?q=@x"
    assert redact_text(f"https://h/v1?model=m&api_key={SENTINEL}&n=2") == (
        "https://h/v1?model=m&api_key=***&n=2")
    assert redact_text(f'echo: "Bearer {SENTINEL}"') == 'echo: "Bearer ***"'
    assert redact_text("max_new_tokens=16 http://host:8000/v1") == (
        "max_new_tokens=16 http://host:8000/v1")
    assert scrub(f"key {SENTINEL[:12]}... rejected", SENTINEL) == "key [redacted]... rejected"


def test_stage_runs_keep_max_new_tokens_and_never_a_secret(tmp_path: Path) -> None:
    """Through real commands: generate records its --max-new-tokens; a judge given a password in
    its --base-url works, records the URL with the password hidden, and the password is nowhere
    in the store's bytes or the output; a secret-named argument is never recorded."""
    from judge_server import fault_server

    from patchdb.store import open_store
    from patchdb.store.runs import stage_run

    model = save_tiny_llama(tmp_path / "m", n_layers=4)
    config = tmp_path / "sweep.toml"
    config.write_text(
        f'[sweep]\nname = "tiny"\nmodel = {json.dumps(str(model))}\ndtype = "float32"\n'
        'steer_layer = 1\npatch_layers = "2"\nsamples = 1\nmax_new_tokens = 4\n'
        'positive_words = ["Bread"]\nnegative_words = ["Dust"]\n')
    db = tmp_path / "store.sqlite"
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    generate = run_cli("generate", "--db", db, "--quiet", "--max-new-tokens", "2")
    assert generate.exit_code == 0, generate.output
    with fault_server() as server:
        url = server.base_url.replace("http://", f"http://judge:{URL_SECRET}@")
        judge = run_cli("judge", "--db", db, "--base-url", url, "--no-progress",
                        "--judge-max-new-tokens", "7")
    assert judge.exit_code == 0, judge.output
    # 8 rollouts (4 keys and a baseline per target condition), coherence + detection each
    assert server.stats.requests == 16
    store = open_store(str(db))
    with stage_run(store, "probe", {"hf_token": SENTINEL, "auth_token": SENTINEL,
                                    "max_new_tokens": 3}):
        pass
    store.close()
    with sqlite3.connect(db) as conn:
        runs = dict(conn.execute("SELECT stage, arguments FROM stage_runs").fetchall())
    assert json.loads(runs["generate"])["max_new_tokens"] == 2
    judged = json.loads(runs["judge"])
    assert judged["hf_max_new_tokens"] == 7
    assert judged["base_url"] == server.base_url.replace("http://", "http://judge:***@")
    assert json.loads(runs["probe"]) == {"max_new_tokens": 3}
    assert URL_SECRET not in generate.output + judge.output
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {str(p): secrets_in(p) for p in files if secrets_in(p)} == {}


# --- every SQL statement is parameterised -----------------------------------------------------

SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|DROP|CREATE|ALTER|PRAGMA|BEGIN|WHERE|"
                       r"FROM|VALUES|TABLE|VIEW)\b")
# Interpolations that are constants or closed choices, not data: (file, expression).
ALLOWED = {
    ("patchdb/store/engine.py", "BUSY_TIMEOUT_MS"),  # an int constant
    ("patchdb/store/engine.py", "mode"),  # "IMMEDIATE" or "DEFERRED", from execution options
    ("migrations/versions/0001_initial_schema.py", "view"),  # a loop over constant view names
    ("patchdb/report/export.py", "_VERDICT_COLUMNS"),  # built from the GRADERS constant
    ("patchdb/report/export.py", "_VERDICT_JOINS"),  # built from the GRADERS constant
    ("patchdb/report/html.py", "PICKED_CTE"),  # a constant SQL string with bound parameters
}


def _interpolations(node: ast.AST) -> tuple[str, list[ast.expr]] | None:
    """(constant text, interpolated expressions) if node builds a string from variables."""
    if isinstance(node, ast.JoinedStr):
        text = "".join(v.value for v in node.values if isinstance(v, ast.Constant)
                       and isinstance(v.value, str))
        exprs = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
        return text, exprs
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        for side, other in ((node.left, node.right), (node.right, node.left)):
            if isinstance(side, ast.Constant) and isinstance(side.value, str):
                return side.value, [other]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
            and isinstance(node.func.value.value, str)):
        return node.func.value.value, [*node.args, *(k.value for k in node.keywords)]
    return None


def sql_built_from_variables(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            built = _interpolations(node)
            if built is None or not SQL_WORDS.search(built[0]):
                continue
            for expr in built[1]:
                if (relative, ast.unparse(expr)) not in ALLOWED:
                    found.append(f"{relative}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def package_sources() -> list[Path]:
    return sorted([*(ROOT / "patchdb").rglob("*.py"), *(ROOT / "migrations").rglob("*.py")])


def test_no_sql_is_built_from_variables() -> None:
    assert len(package_sources()) > 40
    assert sql_built_from_variables(package_sources()) == []


def test_the_sql_check_can_fail(tmp_path: Path) -> None:
    bad = ROOT / "patchdb" / "_sql_check_probe.py"  # parsed only, never imported
    try:
        bad.write_text('def q(s, word):\n    s.execute(f"SELECT * FROM rollouts WHERE w = \'{word}\'")\n'
                       '    s.execute("DELETE FROM t WHERE id = %s" % word)\n'
                       '    s.execute("UPDATE t SET a = {}".format(word))\n')
        assert len(sql_built_from_variables([bad])) == 3
    finally:
        bad.unlink()


# --- hostile words travel through every stage as data ------------------------------------------

HOSTILE = "Robert'); DROP TABLE rollouts;--"
HOSTILE_2 = 'Dust" OR 1=1; DELETE FROM sweeps; --'


def tables(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [n for (n,) in conn.execute("SELECT name FROM sqlite_master ORDER BY name")]


def test_a_word_that_looks_like_sql_is_stored_as_a_word(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "m", n_layers=4)
    config = tmp_path / "sweep.toml"
    config.write_text(
        "[sweep]\n"
        f'name = {json.dumps(HOSTILE)}\nmodel = {json.dumps(str(model))}\ndtype = "float32"\n'
        'steer_layer = 1\npatch_layers = "2"\nsamples = 1\nmax_new_tokens = 2\n'
        f"positive_words = [{json.dumps(HOSTILE)}]\nnegative_words = [{json.dumps(HOSTILE_2)}]\n")
    db = tmp_path / "store.sqlite"
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    schema = tables(db)
    assert {"rollouts", "sweeps", "judgments"} <= set(schema)
    for args in (["generate", "--quiet"], ["generate", "--quiet", "--words", HOSTILE],
                 ["status"], ["report"], ["report", "--export-json", "--out", "out"]):
        result = run_cli(*args, "--db", db)
        assert result.exit_code == 0, result.output
    bad = run_cli("status", "--db", db, "--sweep", "x' OR '1'='1")
    assert bad.exit_code == 1 and bad.output.startswith("Error: no sweep named")
    assert tables(db) == schema
    with sqlite3.connect(db) as conn:
        keys = conn.execute("SELECT source_word, target_word FROM rollouts").fetchall()
        assert conn.execute("SELECT name FROM sweeps").fetchall() == [(HOSTILE,)]
    assert len(keys) == 8  # one key per experiment at one layer, and their 4 baselines; 1 sample
    assert (HOSTILE_2, HOSTILE) in keys and (HOSTILE, "") in keys
    # the experiments' folders (named by the config, not the hostile words) and the folder's
    # owner marker; nothing named after a word
    assert sorted(p.name for p in Path("out").iterdir()) == sorted(
        [".patchdb-report", "failure_to_success", "success_to_failure", "steered_to_unsteered",
         "unsteered_to_steered"])


# --- tensors load with weights_only=True -------------------------------------------------------

class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious vector file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.marker,)


def test_a_vector_file_that_runs_code_is_refused(tmp_path: Path, db_path: Path) -> None:
    make_store(db_path, last=0)
    marker = tmp_path / "pwned"
    evil = tmp_path / "vectors.pt"
    torch.save({"Bread": Payload(marker), "Trees": torch.ones(4)}, evil)
    before = file_digest(db_path)
    result = run_cli("vectors", "--db", db_path, "--import", evil, "--layer", "1")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot read {evil} as a torch file of tensors")
    assert len(result.output.strip().splitlines()) == 1
    assert "refused by weights_only=True (Trying to load unsupported GLOBAL posix.mkdir" in result.output
    assert "weights_only` set to `False`" not in result.output  # no advice to run its code
    assert not marker.exists()
    assert file_digest(db_path) == before
    torch.load(evil, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.is_dir()
    pickle.dumps(Payload(marker))


# --- names never become unsanitised path components --------------------------------------------

def test_an_export_cannot_write_outside_its_folder(tmp_path: Path, db_path: Path) -> None:
    tree = tmp_path / "tree"
    for word in ("..", "..\\..\\evil", "~root", "C:evil", "Bread"):
        path = tree / "unsteered_to_steered" / "layer_40" / "rollouts.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[word] = ["an answer"]
        path.write_text(json.dumps(data))
    result = run_cli("import-json", tree, "--db", db_path, "--sweep", "../../evil",
                     "--steer-layer", "1")
    assert result.exit_code == 0, result.output
    before = {p for p in tmp_path.parent.rglob("*") if p.is_relative_to(tmp_path.parent)}
    for args in (["report", "--export-json"], ["report", "--html"],
                 ["report", "--export-json", "--out", "out"]):
        assert run_cli(*args, "--db", db_path).exit_code == 0
    created = {p for p in tmp_path.parent.rglob("*")} - before
    assert created
    assert all(p.is_relative_to(tmp_path / "patchdb_report") or p.is_relative_to(tmp_path / "out")
               for p in created), sorted(map(str, created))
    assert not (tmp_path.parent.parent / "evil").exists()
    exported = json.loads((tmp_path / "out" / "unsteered_to_steered" / "layer_40" /
                           "rollouts.json").read_text())
    assert set(exported) == {"..", "..\\..\\evil", "~root", "C:evil", "Bread"}
