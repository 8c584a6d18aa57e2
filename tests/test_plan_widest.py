"""`patchdb label --plan widest`: the next label goes where the corrected band is widest."""

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from labeled_store import fill, init_store
from ppi_sim import Judge, simulate
from sqlalchemy import select

from patchdb.label.labels import set_label
from patchdb.label.widest import cell_widths
from patchdb.store import Experiment, Rollout, open_store


@pytest.fixture
def db(store_db: str, tmp_path: Path) -> str:
    """The small judged sweep (judge: YES on sample 0, NO on sample 1 for every grader) with
    every rollout of failure_to_success at layer 3 labeled for both of its graders."""
    init_store(store_db, tmp_path)
    store = open_store(store_db)
    store.transact(fill)

    def label(session) -> None:  # type: ignore[no-untyped-def]
        for rid in session.scalars(select(Rollout.id).join(Experiment).where(
                Experiment.name == "failure_to_success", Rollout.patch_layer == 3)):
            set_label(session, rid, "coherence", "ada", True)
            set_label(session, rid, "detection_identification", "ada", rid % 2 == 0)

    store.transact(label)
    store.close()
    return store_db


def test_the_next_label_goes_to_a_cell_whose_band_is_undefined(db: str) -> None:
    """failure_to_success layer 3 is labeled; failure_to_success layer 4 comes first of the
    three unlabeled cells (name order among equally wide ones), and its judge-NO stratum before
    YES (both unlabeled). The judge says NO on sample 1: of the four such rollouts, the one with
    the smallest sha256 of its id."""
    with open_store(db).read() as s:
        ids = list(s.scalars(select(Rollout.id).join(Experiment).where(
            Experiment.name == "failure_to_success", Rollout.patch_layer == 4,
            Rollout.sample_index == 1)))
    expected = min(ids, key=lambda r: hashlib.sha256(str(r).encode()).hexdigest())
    result = run_cli("label", "--db", db, "--labeler", "ada", "--next", "--json",
                     "--grader", "detection_identification", "--plan", "widest")
    assert result.exit_code == 0, result.output
    item = json.loads(result.output)["item"]
    assert (item["rollout_id"], item["experiment"], item["patch_layer"]) == (
        expected, "failure_to_success", 4)
    assert item["judge_verdict"] is False
    # the balanced plan, asked the same, keeps its own order (not necessarily this rollout)
    balanced = run_cli("label", "--db", db, "--labeler", "ada", "--next", "--json",
                       "--grader", "detection_identification")
    assert balanced.exit_code == 0, balanced.output


def test_the_page_follows_the_widest_plan(db: str) -> None:
    """The labeling page, served with --plan widest, shows first the answer `label --next
    --plan widest` names, and served with the balanced plan the balanced one: with
    failure_to_success layer 4 half labeled too, the two plans want different answers."""
    from label_client import Tab

    from patchdb.label.server import make_server
    from patchdb.label.sessions import Labeling

    def first_on_the_page(plan: str) -> int:
        store = open_store(db)
        server = make_server(Labeling(store, None, ["detection_identification"], "ada", 100,
                                      None, plan=plan))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            item = Tab(server).next()
            assert item is not None
            return int(item["rollout_id"])
        finally:
            server.shutdown()
            server.server_close()
            store.close()

    def half(session) -> None:  # type: ignore[no-untyped-def]
        for rid in session.scalars(select(Rollout.id).join(Experiment).where(
                Experiment.name == "failure_to_success", Rollout.patch_layer == 4)):
            if rid % 2 == 0:
                set_label(session, rid, "coherence", "ada", True)
                set_label(session, rid, "detection_identification", "ada", True)

    store = open_store(db)
    store.transact(half)
    store.close()
    asked = {}
    for plan in ("widest", "balanced"):
        result = run_cli("label", "--db", db, "--labeler", "ada", "--next", "--json",
                         "--grader", "detection_identification", "--plan", plan)
        assert result.exit_code == 0, result.output
        asked[plan] = json.loads(result.output)["item"]["rollout_id"]
    assert asked["widest"] != asked["balanced"]
    assert first_on_the_page("widest") == asked["widest"]
    assert first_on_the_page("balanced") == asked["balanced"]


def test_fewer_labels_make_a_wider_band() -> None:
    """Simulated cells alike but for their labels (12 or 40 a stratum): those with fewer labels
    are wider on average, so they are labeled first; with 5 a stratum the band is n/a (under
    10 labels), which counts as widest."""
    judge = Judge(0.95, 0.9, (0.85,), (0.9,))
    rng = np.random.default_rng(3)
    counts = {f"{labels}-{i}": simulate(rng, (0.3,), judge, labels_per_stratum=labels,
                                        concentration=30, name=f"{labels}-{i}").counts
              for labels in (5, 12, 40) for i in range(10)}
    widths = cell_widths(counts)
    mean = {labels: np.mean([widths[(f"{labels}-{i}", 0)] for i in range(10)])
            for labels in (12, 40)}
    assert mean[12] > mean[40] > 0
    assert all(widths[(f"5-{i}", 0)] == np.inf for i in range(10))
