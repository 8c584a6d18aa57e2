"""The labeling page's state, apart from HTTP: one labeler's plan options and one session per page
load. Each session has its own skips and undo stack; an answer shown to a session is reserved
for it (until it is labeled or skipped, the session moves on or closes, or RESERVE_S pass), so
two tabs never show the same answer at the same time. Every method takes one lock: the page's
calls run one at a time.
"""

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from patchdb.errors import LabelError, PatchdbError
from patchdb.label.labels import find_label, remove_label, set_label
from patchdb.label.plan import Candidates, Item, plan_next
from patchdb.store import Store
from patchdb.store.sweeps import get_sweep

# What the page sees of an answer before it is labeled: never the judge's verdict or reasoning
# (an allowlist, so a field added to Item stays hidden until it is named here).
SHOWN = ("rollout_id", "grader", "experiment", "patch_layer", "source", "target", "word",
         "question", "answer", "grader_question")
RESERVE_S = 15 * 60  # a closed tab that could not say so holds its answer this long at most
MAX_SESSIONS = 32  # the least recently used session ends beyond this many
MAX_NOTE = 2000


class SessionEnded(PatchdbError):
    """The page's session is unknown: the tab was closed, or the server restarted."""


class Conflict(PatchdbError):
    """The answer is reserved by another session (this one held it too long)."""


Key = tuple[int, str]


@dataclass
class PageSession:
    """One page load: its skips, its undo steps, the answer it shows and one it must show again."""

    id: str
    skipped: set[Key] = field(default_factory=set)
    # each step: label or skip, the answer, and (a label) its row's id and time as written
    history: list[tuple[str, Item, tuple[int, Any] | None]] = field(default_factory=list)
    current: Item | None = None
    pending: Item | None = None


def _key(item: Item) -> Key:
    return (item.rollout_id, item.grader)


def parse_answer(body: dict[str, Any], with_label: bool) -> tuple[Key, bool, str | None]:
    """(rollout id, grader), the label and the note of a request body, strictly typed: a label
    is a JSON boolean, never a string or a number."""
    rollout_id, grader = body.get("rollout_id"), body.get("grader")
    if not isinstance(rollout_id, int) or isinstance(rollout_id, bool):
        raise LabelError("rollout_id must be an integer")
    if not isinstance(grader, str):
        raise LabelError("grader must be a string")
    if not with_label:
        return (rollout_id, grader), False, None
    label, note = body.get("label"), body.get("note")
    if not isinstance(label, bool):
        raise LabelError("label must be true or false")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise LabelError(f"note must be a string of at most {MAX_NOTE} characters, or null")
    return (rollout_id, grader), label, note or None


class Labeling:
    """One labeler's page: the store, what the plan is asked, and the sessions of open tabs."""

    def __init__(self, store: Store, sweep: str | None, graders: list[str], labeler: str,
                 target: int, judge_config: int | None,
                 clock: Callable[[], float] = time.monotonic, plan: str = "balanced") -> None:
        self.store, self.sweep, self.graders = store, sweep, graders
        self.labeler, self.target, self.judge_config = labeler, target, judge_config
        self.plan = plan  # "balanced", or "widest": where the corrected band is widest
        self.clock = clock
        self.lock = threading.Lock()
        self.sessions: OrderedDict[str, PageSession] = OrderedDict()
        self.reserved: dict[Key, tuple[str, float]] = {}  # answer -> (session id, expiry)
        self.candidates: dict[str, Candidates] = {}  # the sweep's rollouts do not change

    def _plan(self, skipped: set[Key]) -> tuple[Item | None, list[dict[str, Any]]]:
        with self.store.read() as session:
            item, progress = plan_next(session, get_sweep(session, self.sweep), self.graders,
                                       self.labeler, self.target, self.judge_config, skipped,
                                       self.candidates, plan=self.plan)
        return item, [vars(p) for p in progress]

    def check(self) -> None:
        """Refuse a bad sweep or judge config before a URL is printed."""
        with self.lock:
            self._plan(set())

    def open(self) -> dict[str, Any]:
        """A new session for a page load."""
        with self.lock:
            page = PageSession(secrets.token_urlsafe(16))
            self.sessions[page.id] = page
            while len(self.sessions) > MAX_SESSIONS:
                self._end(next(iter(self.sessions)))
            return {"session": page.id}

    def close(self, session_id: str) -> dict[str, Any]:
        """End a session (its tab closed): its reserved answer is free for other tabs."""
        with self.lock:
            self._session(session_id)
            self._end(session_id)
            return {"closed": True}

    def next(self, session_id: str) -> dict[str, Any]:
        """The session's answer to label (without the judge's verdict), reserved for it, and
        the progress: the answer it shows until that is labeled or skipped (unless another tab
        took it over), else the plan's next. Answers other tabs show are left out, and counted."""
        with self.lock:
            page = self._session(session_id)
            elsewhere = self._held_elsewhere(page)
            item, progress = self._plan(page.skipped | elsewhere)
            if page.pending is not None:
                item, page.pending = page.pending, None
            elif page.current is not None and _key(page.current) not in elsewhere:
                item = page.current
            self._release(page)
            page.current = item
            if item is not None:
                self.reserved[_key(item)] = (page.id, self.clock() + RESERVE_S)
            shown = None if item is None else {k: item.to_dict()[k] for k in SHOWN}
            return {"item": shown, "progress": progress, "labeler": self.labeler,
                    "elsewhere": len(elsewhere)}

    def label(self, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Write the label of the answer this session shows; reply with the judge's verdict and
        reasoning, revealed only now so they cannot anchor the label."""
        key, value, note = parse_answer(body, with_label=True)
        with self.lock:
            page = self._session(session_id)
            item = self._claim(page, key)

            def write(s: Any) -> tuple[int, Any]:
                row = set_label(s, item.rollout_id, item.grader, self.labeler, value, note,
                                sweep=get_sweep(s, self.sweep), overwrite=False)
                return int(row.id), row.created_at

            written = self.store.transact(write)
            self._release(page)
            page.current = None
            page.history.append(("label", item, written))
            return {"rollout_id": item.rollout_id, "grader": item.grader, "label": value,
                    "judge_verdict": item.judge_verdict, "judge_reply": item.judge_reply}

    def skip(self, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Skip the answer this session shows, for this session only."""
        key, _, _ = parse_answer(body, with_label=False)
        with self.lock:
            page = self._session(session_id)
            item = self._claim(page, key)
            self._release(page)
            page.current = None
            page.skipped.add(key)
            page.history.append(("skip", item, None))
            return {"skipped": item.rollout_id, "grader": item.grader}

    def undo(self, session_id: str) -> dict[str, Any]:
        """Take back this session's last label or skip; its answer is shown again next (unless
        another tab shows it now: a skipped answer is free for other tabs, or labeled it
        since). Only the label this tab wrote is removed, never one written since; a failed
        undo keeps its step, to be tried again."""
        with self.lock:
            page = self._session(session_id)
            if not page.history:
                return {"undone": None}
            action, item, written = page.history[-1]
            if action == "label":
                self.store.transact(lambda s: remove_label(s, item.rollout_id, item.grader,
                                                           self.labeler, written))
                labeled = False
            else:
                with self.store.read() as s:
                    labeled = find_label(s, item.rollout_id, item.grader,
                                         self.labeler) is not None
                page.skipped.discard(_key(item))
            page.history.pop()
            again = not labeled and _key(item) not in self._held_elsewhere(page)
            if again:
                self._release(page)
                page.current = page.pending = item
                self.reserved[_key(item)] = (page.id, self.clock() + RESERVE_S)
            return {"undone": action, "rollout_id": item.rollout_id, "grader": item.grader,
                    "shown_again": again}

    def _session(self, session_id: str) -> PageSession:
        page = self.sessions.get(session_id)
        if page is None:
            raise SessionEnded("this page's session has ended (its tab was closed, or "
                               f"{MAX_SESSIONS} newer page loads replaced it); reload the page")
        self.sessions.move_to_end(session_id)
        return page

    def _end(self, session_id: str) -> None:
        page = self.sessions.pop(session_id)
        self._release(page)

    def _release(self, page: PageSession) -> None:
        """Free the answer this session shows, if it still holds it."""
        if page.current is not None and self.reserved.get(_key(page.current), ("",))[0] == page.id:
            del self.reserved[_key(page.current)]

    def _held_elsewhere(self, page: PageSession) -> set[Key]:
        """Answers other live sessions show now (expired reservations are dropped)."""
        now = self.clock()
        for key, (_, expiry) in list(self.reserved.items()):
            if expiry <= now:
                del self.reserved[key]
        return {key for key, (holder, _) in self.reserved.items() if holder != page.id}

    def _claim(self, page: PageSession, key: Key) -> Item:
        """The answer this session shows, if `key` is it and no other session took it over."""
        if page.current is None or _key(page.current) != key:
            raise LabelError(f"rollout {key[0]} ({key[1]}) is not the answer this page shows")
        if key in self._held_elsewhere(page):
            raise Conflict(f"rollout {key[0]} ({key[1]}) was open here for over "
                           f"{RESERVE_S // 60} minutes and another tab shows it now")
        return page.current
