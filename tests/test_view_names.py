"""Every view names a unit's words as the tables do, `source_word` and `target_word` ('' for no
steering), and keeps the older `source` / `target` columns ('(none)' for no steering) so
queries written for them still run (migration 0009), on SQLite and PostgreSQL.

The store: a small sweep registered with no rollouts, then hand rows: three rollouts of
unsteered_to_steered (Bread at layer 2 from no source; the no-injection baseline of
steered_to_unsteered at -1 with both words '') and two readouts of the same units.
"""

from pathlib import Path

import pytest
from alembic import command
from judge_server import make_store
from pg import execute, query
from sqlalchemy import inspect

from patchdb.store import open_store
from patchdb.store.migrate import alembic_config, current_revision, head_revision

EXPERIMENTS = ["steered_to_unsteered", "unsteered_to_steered"]
# (experiment, patch layer, source word, target word)
UNITS = [("unsteered_to_steered", 2, "", "Bread"), ("steered_to_unsteered", 3, "Trees", ""),
         ("steered_to_unsteered", -1, "", "")]
# What each view shows for them: (patch layer, source_word, target_word, source, target)
SHOWN = [(-1, "", "", "(none)", "(none)"), (2, "", "Bread", "(none)", "Bread"),
         (3, "Trees", "", "Trees", "(none)")]
WORD_VIEWS = ["rollouts_readable", "readouts_readable", "sample_scores", "layer_rates",
              "yes_bias"]


def hand_store(db: str) -> None:
    make_store(db, last=0, experiments=EXPERIMENTS)
    ids = dict(query(db, "SELECT name, id FROM experiments"))
    execute(db, "INSERT INTO rollouts (experiment_id, patch_layer, source_word, target_word, "
                "sample_index, answer, n_tokens, finish_reason, seed, created_at) VALUES "
                "(:e, :layer, :s, :t, 0, 'an answer', 2, 'stop', 0, '2026-12-06 00:00:00')",
            [{"e": ids[e], "layer": layer, "s": s, "t": t} for e, layer, s, t in UNITS])
    execute(db, "INSERT INTO readouts (experiment_id, patch_layer, source_word, target_word, "
                "question, p_yes, p_no, entropy, top_token, created_at) VALUES "
                "(:e, :layer, :s, :t, '', 0.5, 0.25, 1.0, 'Yes', '2026-12-06 00:00:00')",
            [{"e": ids[e], "layer": layer, "s": s, "t": t} for e, layer, s, t in UNITS])


@pytest.mark.parametrize("view", ["rollouts_readable", "readouts_readable", "sample_scores"])
def test_new_and_old_column_names_on_the_rows_views(store_db: str, view: str) -> None:
    hand_store(store_db)
    rows = query(store_db, f"SELECT patch_layer, source_word, target_word, source, target "
                           f"FROM {view} ORDER BY patch_layer")
    assert rows == SHOWN
    # the recipes' filters, by the new name and by the old
    assert query(store_db, f"SELECT patch_layer FROM {view} WHERE target_word = 'Bread'") == \
        query(store_db, f"SELECT patch_layer FROM {view} WHERE target = 'Bread'") == [(2,)]


def test_new_and_old_column_names_on_the_rate_views(store_db: str) -> None:
    hand_store(store_db)
    assert query(store_db, "SELECT patch_layer, source_word, target_word, source, target "
                           "FROM layer_rates ORDER BY patch_layer") == SHOWN[1:]
    assert query(store_db, "SELECT experiment, target_word, target FROM baseline_rates") == [
        ("steered_to_unsteered", "", "(none)")]


def test_every_view_with_an_old_name_has_the_tables_name(store_db: str) -> None:
    """The rule itself, read from the database's catalogue: `source` comes with
    `source_word`, `target` with `target_word`."""
    store = open_store(store_db, create=True)
    try:
        with store.engine.connect() as conn:
            inspector = inspect(conn)
            columns = {view: [c["name"] for c in inspector.get_columns(view)]
                       for view in inspector.get_view_names()}
    finally:
        store.close()
    assert set(WORD_VIEWS) <= set(columns)
    for view, names in columns.items():
        for old, new in (("source", "source_word"), ("target", "target_word")):
            if old in names:
                assert new in names, (view, names)


def test_downgrade_to_0008_takes_the_new_names_away_and_upgrade_brings_them_back(
        tmp_path: Path) -> None:
    db = str(tmp_path / "store.sqlite")
    hand_store(db)
    store = open_store(db)
    cfg = alembic_config(store.url)
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008")
        conn.commit()
    assert current_revision(store.engine) == "0008"
    store.close()
    assert query(db, "SELECT target FROM rollouts_readable ORDER BY patch_layer") == [
        ("(none)",), ("Bread",), ("(none)",)]
    with pytest.raises(Exception, match="target_word"):
        query(db, "SELECT target_word FROM rollouts_readable")
    assert current_revision(open_store(db).engine) == head_revision()
    assert query(db, "SELECT patch_layer, source_word, target_word, source, target "
                     "FROM readouts_readable ORDER BY patch_layer") == SHOWN
