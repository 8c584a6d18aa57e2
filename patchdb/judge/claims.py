"""Where a judge run's work comes from: pages of pending keys, claimed a few at a time under a
lease (leases.py), rendered into grader prompts and answered from the cache where it can.

Every method runs in a thread of the run's event loop and opens its own session.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from patchdb.judge import cache as judge_cache
from patchdb.judge import leases
from patchdb.judge.plan import Call, Fresh, Scope
from patchdb.judge.settings import Resolved
from patchdb.judge.templates import Templates
from patchdb.store.store import Store


@dataclass
class Work:
    """One claimed call, rendered; `cached` holds the stored reply when the cache has one."""

    call: Call
    prompt: str
    request_hash: str | None
    cached: str | None


class WorkSource:
    """The pending keys of one run's scope, as this run (lease holder `fresh.run_id`) may
    take them."""

    def __init__(self, store: Store, scope: Scope, config_id: int, mode: str, fresh: Fresh,
                 lease_s: float, templates: Templates, question: str, resolved: Resolved,
                 cache: bool) -> None:
        self.store, self.scope, self.config_id, self.mode = store, scope, config_id, mode
        self.fresh, self.lease_s = fresh, lease_s
        self.templates, self.question, self.resolved, self.cache = (templates, question,
                                                                    resolved, cache)

    def page(self, after_id: int) -> leases.Page:
        """The next page of rollouts after `after_id`: its free keys, and where others hold some."""
        with self.store.read() as session:
            return leases.claimable_page(session, self.scope, self.config_id, self.mode,
                                         self.fresh, after_id)

    def claim(self, calls: Sequence[Call]) -> tuple[list[Work], int | None]:
        """Lease what is still free of `calls` to this run, rendered; and the first rollout
        whose key another run took first (None: none)."""
        got = self.store.transact(lambda session: leases.claim(
            session, self.fresh.run_id, self.config_id, self.mode, self.fresh, calls,
            self.lease_s))
        return self._render(got.calls), got.taken_from

    def renew(self) -> None:
        self.store.transact(lambda session: leases.renew(session, self.fresh.run_id,
                                                         self.lease_s))

    def release(self) -> None:
        self.store.transact(lambda session: leases.release(session, self.fresh.run_id))

    def _render(self, calls: list[Call]) -> list[Work]:
        """The calls' grader prompts, with the cache's replies where it has them."""
        work = []
        for call in calls:
            prompt = self.templates.render(call.grader, self.question, call.answer, call.word)
            digest = None
            if self.cache:
                digest = judge_cache.request_hash(
                    self.resolved.backend, self.resolved.model, self.resolved.reasoning, prompt,
                    self.resolved.verdict,
                )
            work.append(Work(call, prompt, digest, None))
        if self.cache and work:
            with self.store.read() as session:
                hits = judge_cache.lookup(session, [w.request_hash or "" for w in work])
            for w in work:
                w.cached = hits.get(w.request_hash or "")
        return work
