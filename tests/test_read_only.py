"""A store on read-only media: the commands that only read it work, every other command says in
one line that it cannot write, and the store's bytes are left as they were.

"Read-only" is made for real: the store's file and folder lose their write bits, and the
commands run in a child process that cannot override them (as root: with CAP_DAC_OVERRIDE
dropped by setpriv, since root ignores permission bits). The expected rates and counts are the
hand-built store's: 2 words x 2 layers x 2 samples, all coherent, Bread detected, Trees not.
"""

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from conftest import file_digest
from judge_server import make_store
from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.migrate import alembic_config, head_revision
from patchdb.store.models import Label

DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
        "--inh-caps=-dac_override,-dac_read_search", "--"]


def cannot_override() -> list[str]:
    """The prefix that runs a command without the power to write a file it lacks write bits
    for: nothing for an ordinary user, setpriv dropping the override for root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.fail("running as root needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return DROP


def patchdb(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_")}
    return subprocess.run([*cannot_override(), sys.executable, "-m", "patchdb",
                           *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def fill(db: Path) -> None:
    """Judgments (coherent: all; detected: Bread yes, Trees no) and coherence labels of
    Bread's rollouts, under one judge config."""
    store = open_store(str(db))
    try:
        def add(session: Session) -> None:
            judge = JudgeConfig(model="j", reasoning="low", template_version="v",
                                backend="openai")
            session.add(judge)
            session.flush()
            for rollout in session.scalars(select(Rollout)).all():
                bread = rollout.source_word == "Bread"
                session.add(Judgment(rollout_id=rollout.id, grader="coherence",
                                     judge_config_id=judge.id, verdict=True))
                session.add(Judgment(rollout_id=rollout.id, grader="detection",
                                     judge_config_id=judge.id, verdict=bread))
                if bread:
                    session.add(Label(rollout_id=rollout.id, grader="coherence",
                                      labeler="me", label=True))
        store.transact(add)
    finally:
        store.close()
    with sqlite3.connect(db) as conn:  # the resting state: everything in the file, no WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def lock(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A folder for the store; write bits are given back afterwards so it can be removed."""
    folder = tmp_path / "media"
    folder.mkdir()
    yield folder
    for path in [folder, *folder.iterdir()]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def read_only_store(folder: Path) -> Path:
    db = folder / "store.sqlite"
    make_store(db, experiments=["steered_to_unsteered"])  # Bread and Trees, layers 2-3, 2 each
    fill(db)
    lock(folder)
    return db


def test_the_set_up_really_cannot_write(read_only_store: Path, tmp_path: Path) -> None:
    probe = subprocess.run([*cannot_override(), "sh", "-c", f"echo x >> '{read_only_store}'"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


def test_read_commands_work_on_a_read_only_store(read_only_store: Path, tmp_path: Path) -> None:
    before = file_digest(read_only_store)
    files = sorted(p.name for p in read_only_store.parent.iterdir())

    status = patchdb("status", "--db", read_only_store, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    layer_2 = [line.split() for line in status.stdout.splitlines()
               if line.startswith("steered_to_unsteered") and line.split()[1] == "2"]
    assert layer_2 == [["steered_to_unsteered", "2", "4/4", "8/8", "0", "0", "0"]]

    report = patchdb("report", "--db", read_only_store, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table = report.stdout.split("Where the difference is decided")[0]  # the rate table
    rows = {line.split()[0]: line.split()[1:3] for line in table.splitlines()
            if line.split()[:1] in (["Bread"], ["Trees"], ["Mean"])}
    assert rows == {"Bread": ["100", "100"], "Trees": ["0", "0"], "Mean": ["50", "50"]}
    assert (tmp_path / "patchdb_report" / "small" / "steered_to_unsteered" /
            "sweep_plot.png").exists()  # written where the command runs, not beside the store

    calibrate = patchdb("calibrate", "--db", read_only_store, "--json", cwd=tmp_path)
    assert calibrate.returncode == 0, calibrate.stderr
    assert '"tp": 4' in calibrate.stdout  # Bread's 4 coherence labels, all judged YES

    label = patchdb("label", "--next", "--db", read_only_store, "--labeler", "me",
                    cwd=tmp_path)
    assert label.returncode == 0, label.stderr
    assert "grader detection" in label.stdout  # coherence of Bread is labeled; detection next

    assert file_digest(read_only_store) == before
    assert sorted(p.name for p in read_only_store.parent.iterdir()) == files  # no -wal, -shm


@pytest.mark.parametrize("args", [
    ["label", "--set", "1", "--grader", "detection", "--yes", "--labeler", "me"],
    ["judge", "--base-url", "http://127.0.0.1:9/v1"],
    ["init", "--config", "other.toml"],
])
def test_commands_that_write_say_so_in_one_line(read_only_store: Path, tmp_path: Path,
                                                args: list[str]) -> None:
    (tmp_path / "other.toml").write_text('[sweep]\nname = "other"\n')
    before = file_digest(read_only_store)
    result = patchdb(*args, "--db", read_only_store, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write to {read_only_store}: it is read-only here (the file or its folder "
        "cannot be written); commands that only read it (status, report, calibrate, "
        "label --next) still work")
    assert file_digest(read_only_store) == before


def test_a_read_only_store_that_needs_an_upgrade_is_not_upgraded(folder: Path,
                                                                 tmp_path: Path) -> None:
    db = folder / "store.sqlite"
    make_store(db, experiments=["steered_to_unsteered"])
    store = open_store(str(db))
    cfg = alembic_config(store.url)
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
        conn.commit()
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    lock(folder)
    before = file_digest(db)
    result = patchdb("status", "--db", db, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"Error: {db} is read-only here and has schema 0005, older than this patchdb's "
        f"{head_revision()}; it must be upgraded before it can be read: run any patchdb "
        "command on it where it can be written (or on a writable copy)")
    assert file_digest(db) == before


def test_a_read_only_store_with_changes_left_in_its_wal_is_refused(folder: Path,
                                                                   tmp_path: Path) -> None:
    """Opened immutable, SQLite would not see what the write-ahead log holds: refused, not
    read wrong."""
    db = folder / "store.sqlite"
    make_store(db, experiments=["steered_to_unsteered"])
    keep = sqlite3.connect(db)  # an open reader keeps the WAL from being checkpointed away
    keep.execute("PRAGMA wal_autocheckpoint = 0")
    keep.execute("UPDATE rollouts SET answer = 'changed' WHERE id = 1")
    keep.commit()
    wal = db.with_name(db.name + "-wal")
    shutil.copy(wal, tmp_path / "wal")
    keep.close()  # the last connection checkpoints and removes the WAL ...
    shutil.copy(tmp_path / "wal", wal)  # ... so put back the one a crash would have left
    db.with_name(db.name + "-shm").unlink(missing_ok=True)
    lock(folder)
    result = patchdb("status", "--db", db, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"Error: {db} is read-only here and its write-ahead log store.sqlite-wal holds changes "
        "not yet in the file; open it once where it can be written (any patchdb command), "
        "then read it here")


def test_a_read_only_store_that_a_writer_has_open_is_read_with_its_wal(
        read_only_store: Path, tmp_path: Path) -> None:
    """Another process with write access keeps the store open and has committed a change that
    is still only in the write-ahead log: the reader sees it (through the writer's -shm index),
    where opening the file as immutable would have read it without the change."""
    for path in (read_only_store, read_only_store.parent):  # the writer may write
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    writer = sqlite3.connect(read_only_store, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("PRAGMA foreign_keys = ON")
        writer.execute("DELETE FROM rollouts WHERE patch_layer = 3")  # 4 rollouts, 16 judgments
        lock(read_only_store.parent)  # the reader may not
        assert read_only_store.with_name("store.sqlite-wal").stat().st_size > 0
        status = patchdb("status", "--db", read_only_store, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        rows = {line.split()[1]: line.split()[2:4] for line in status.stdout.splitlines()
                if line.startswith("steered_to_unsteered")}
        assert rows["2"] == ["4/4", "8/8"] and rows["3"] == ["0/4", "0/8"]
    finally:
        writer.close()
