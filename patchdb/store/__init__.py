"""The store: schema, sessions and queries. Everything the stages write goes through here."""

from patchdb.store.models import (
    Base,
    ConceptVector,
    Experiment,
    JudgeCacheEntry,
    JudgeConfig,
    Judgment,
    Rollout,
    StageRun,
    Sweep,
    utcnow,
)
from patchdb.store.store import Store, open_store

__all__ = [
    "Base",
    "ConceptVector",
    "Experiment",
    "JudgeCacheEntry",
    "JudgeConfig",
    "Judgment",
    "Rollout",
    "StageRun",
    "Store",
    "Sweep",
    "open_store",
    "utcnow",
]
