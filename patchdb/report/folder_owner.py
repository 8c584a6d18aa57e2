"""Whose report a folder holds. Two stores with a sweep of the same name (two demo stores) both
default to ./patchdb_report/<sweep>/; without a check the second report silently overwrote the
first one's files beside its own. A small marker file in the folder names the store and the
sweep that wrote it, and a report from another store is refused."""

import json
from datetime import UTC, datetime
from pathlib import Path

from patchdb.errors import ReportFolderError
from patchdb.report import default_out_dir
from patchdb.store import Store
from patchdb.store.engine import sqlite_path
from patchdb.store.sweeps import get_sweep

MARKER = ".patchdb-report"  # JSON: the store and the sweep that wrote the folder


def store_identity(store: Store) -> str:
    """Where the store is: a SQLite file's absolute path, or the URL with its password hidden
    (Store.where never holds a password)."""
    path = sqlite_path(store.url)
    return str(path.resolve()) if path is not None else store.where


def _utc(ts: datetime) -> str:
    """SQLite hands back naive UTC, PostgreSQL aware: the same instant reads the same here."""
    return (ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def claim_report_folder(store: Store, sweep_name: str | None, out_dir: Path | None) -> Path:
    """The folder the sweep's report goes to (`out_dir`, else ./patchdb_report/<sweep>/),
    marked as this store's. Refused when the marker names another store, unless it names the
    same sweep registered at the same instant (the store was moved or copied); a folder with no
    marker (new, or written by an older patchdb) is taken as today."""
    with store.read() as session:
        sweep = get_sweep(session, sweep_name)
        name, registered = sweep.name, _utc(sweep.created_at)
    folder = out_dir if out_dir is not None else default_out_dir(name)
    here = store_identity(store)
    marker = folder / MARKER
    try:
        owner = json.loads(marker.read_text())
    except (OSError, ValueError):
        owner = None
    if isinstance(owner, dict) and owner.get("store") != here and not (
            owner.get("sweep") == name and owner.get("sweep_registered") == registered):
        raise ReportFolderError(
            f"{folder} holds the report of sweep {owner.get('sweep')!r} from another store "
            f"({owner.get('store')}); give this one its own folder with --out, or delete "
            f"{folder} first")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"store": here, "sweep": name, "sweep_registered": registered},
                                 indent=1) + "\n")
    return folder
