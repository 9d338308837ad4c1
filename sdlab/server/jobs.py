"""One FIFO job queue for both APIs, persisted in SQLite, and the one worker thread that runs it.

A job is a row: its request (JSON; images live as files in the input folder), its state
(pending -> running -> done | failed | cancelled), result file names and error. State changes are
single transactions in WAL mode, so after a crash or restart every job is done (with its files),
still pending, or failed: a job found `running` at startup is failed with "interrupted by server
restart", never run again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from sdlab.families import LatentFormat
from sdlab.pipeline import StopSampling

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
RESTART_ERROR = "interrupted by server restart"
SHUTDOWN_ERROR = "interrupted by server shutdown"
log = logging.getLogger("sdlab.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, number);
"""


@dataclass(frozen=True)
class Job:
    """One queued request and what became of it."""

    id: str
    number: int
    kind: str  # "a1111" or "comfy": which runner executes it
    request: dict[str, Any]
    state: str
    result: dict[str, Any] | None
    error: str | None
    created: float
    started: float | None
    finished: float | None


class QueueFull(Exception):
    """The queue already holds its maximum of pending jobs."""


def new_job_id() -> str:
    """A fresh job id (also the ComfyUI prompt_id)."""
    return str(uuid.uuid4())


class JobStore:
    """The jobs table: FIFO order, states and results, shared by the HTTP threads and the worker."""

    def __init__(self, path: Path, max_pending: int) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def recover(self) -> list[str]:
        """Fail the jobs a crash left running (they are never run twice); returns their ids."""
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE state = ? RETURNING id",
                (FAILED, RESTART_ERROR, time.time(), RUNNING),
            ).fetchall()
        return [r["id"] for r in rows]

    def add(self, kind: str, request: dict[str, Any], job_id: str | None = None) -> Job:
        """Queue a job at the back; QueueFull when `max_pending` jobs are already waiting."""
        with self._transaction() as db:
            (pending,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (PENDING,)).fetchone()
            if pending >= self.max_pending:
                raise QueueFull(f"the queue is full ({pending} jobs waiting)")
            row = db.execute(
                "INSERT INTO jobs (id, kind, request, state, created) VALUES (?, ?, ?, ?, ?) RETURNING *",
                (job_id or new_job_id(), kind, json.dumps(request), PENDING, time.time()),
            ).fetchone()
        return _job(row)

    def claim(self) -> Job | None:
        """Mark the oldest pending job running and return it (None when nothing waits)."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET state = ?, started = ? WHERE number = "
                "(SELECT MIN(number) FROM jobs WHERE state = ?) RETURNING *",
                (RUNNING, time.time(), PENDING),
            ).fetchone()
        return None if row is None else _job(row)

    def finish(self, job_id: str, state: str, result: dict[str, Any], error: str | None) -> None:
        """Record the end of a running job: its state, result (file names) and error."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, result = ?, error = ?, finished = ? WHERE id = ? AND state = ?",
                (state, json.dumps(result), error, time.time(), job_id, RUNNING),
            )

    def cancel(self, job_ids: list[str] | None = None) -> list[str]:
        """Cancel the given pending jobs (all pending jobs for None); returns the ids cancelled."""
        chosen = "1" if job_ids is None else "id IN (SELECT value FROM json_each(?))"
        args = () if job_ids is None else (json.dumps(job_ids),)
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, error = 'cancelled', finished = ? "
                f"WHERE state = ? AND {chosen} RETURNING id",
                (CANCELLED, time.time(), PENDING, *args),
            ).fetchall()
        return [r["id"] for r in rows]

    def forget(self, job_ids: list[str] | None = None, kind: str | None = None) -> list[str]:
        """Delete finished jobs (all of them for None), of one kind if given (ComfyUI's history clearing)."""
        chosen = "1" if job_ids is None else "id IN (SELECT value FROM json_each(?))"
        args = () if job_ids is None else (json.dumps(job_ids),)
        marks = ", ".join("?" * len(FINISHED))
        query = f"DELETE FROM jobs WHERE state IN ({marks}) AND {chosen}" + (" AND kind = ?" if kind else "")
        values = (*FINISHED, *args, *([kind] if kind else []))
        with self._transaction() as db:
            rows = db.execute(query + " RETURNING id", values).fetchall()
        return [r["id"] for r in rows]

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, states: tuple[str, ...], kind: str | None = None, limit: int = -1) -> list[Job]:
        """Jobs in the given states, oldest first (the last `limit` of them when limit >= 0)."""
        marks = ", ".join("?" * len(states))
        query = f"SELECT * FROM jobs WHERE state IN ({marks})" + (" AND kind = ?" if kind else "")
        query = f"SELECT * FROM ({query} ORDER BY number DESC LIMIT ?) ORDER BY number"
        with self._lock:
            rows = self._db.execute(query, (*states, *([kind] if kind else []), limit)).fetchall()
        return [_job(r) for r in rows]

    def count(self, states: tuple[str, ...]) -> int:
        """How many jobs are in the given states."""
        with self._lock:
            marks = ", ".join("?" * len(states))
            return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states).fetchone()[
                0
            ]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["request"] = json.loads(values["request"])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    return Job(**values)


# ---------------------------------------------------------------------------------------------
# the worker


class Interrupted(StopSampling):
    """The running job was interrupted or cancelled by a client (sampling stops; A1111 keeps the image
    as far as it got)."""


class Skipped(StopSampling):
    """A client asked to skip the image being made (AUTOMATIC1111's skip): its sampling stops, the image
    keeps the last denoised step, and the job goes on with its next batch."""


@dataclass
class Live:
    """What the running job is doing: read by progress routes, flags set by interrupt/skip."""

    job: Job
    started: float = field(default_factory=time.time)
    step: int = 0
    total: int = 0
    job_no: int = 0  # A1111: the batch (of n_iter) being made
    job_count: int = 1
    node: str | None = None  # ComfyUI: the node executing
    latent: Tensor | None = None  # the latest denoised latents, for previews
    latent_format: LatentFormat | None = None  # how to preview them: the sampling model's family's
    preview: str | None = None  # on a front end of a shared queue: the worker's last preview (base64 PNG)
    interrupted: bool = False
    skipped: bool = False
    on_step: Callable[[Live], None] | None = None  # the runner's per-step reporting (previews)
    # On a shared queue: the job is no longer this worker's (its lease went to another worker, or was not
    # renewed by `hold_until`, a time.monotonic() value); it stops and its outcome is not recorded.
    lost: bool = False
    hold_until: float | None = None

    def step_done(self, step: int, total: int, latent: Tensor) -> None:
        """Record a sampling step; raise Interrupted or Skipped when a client asked for it."""
        self.step, self.total, self.latent = step, total, latent
        if self.on_step is not None:
            self.on_step(self)
        self.check()

    def ending(self) -> bool:
        """Whether the job is to stop: a client interrupted it, or this worker no longer holds it (`lost`,
        or `hold_until` passed)."""
        if self.hold_until is not None and time.monotonic() > self.hold_until:
            self.lost = True
        return self.interrupted or self.lost

    def check(self) -> None:
        """Raise Interrupted if the job is `ending`, Skipped if a client asked to skip since last checked."""
        if self.ending():
            raise Interrupted("interrupted" if self.interrupted else "lease lost")
        if self.skipped:
            self.skipped = False
            raise Skipped


@dataclass
class Outcome:
    """How a runner ended a job: the state to record, the result (file names) and error."""

    state: str
    result: dict[str, Any]
    error: str | None = None


Runner = Callable[[Job, Live], Outcome]


class Worker:
    """The single thread that runs jobs oldest first (torch and the loaded model are not shared)."""

    def __init__(self, store: JobStore, runners: dict[str, Runner], on_change: Callable[[], None]) -> None:
        self.store, self.runners, self.on_change = store, runners, on_change
        self.live: Live | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._waiters: dict[str, list[Future[Job]]] = {}
        self._thread = threading.Thread(target=self._loop, name="sdlab-worker", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt the running job (it fails with SHUTDOWN_ERROR) and end the thread."""
        self._stopping = True
        self.interrupt()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, kind: str, request: dict[str, Any], job_id: str | None = None) -> Job:
        """Queue a job (QueueFull when the queue is full) and wake the worker."""
        job = self.store.add(kind, request, job_id)
        with self._wake:
            self._wake.notify()
        self.on_change()
        return job

    def wait(self, job_id: str) -> Future[Job]:
        """A future resolved with the job once it is done, failed or cancelled."""
        future: Future[Job] = Future()
        with self._wake:
            self._waiters.setdefault(job_id, []).append(future)
        job = self.store.get(job_id)
        if job is not None and job.state in FINISHED:
            self._resolve(job_id)
        return future

    def live_of(self, job_id: str) -> Live | None:
        """The live state of a job while it runs here (None otherwise)."""
        live = self.live
        return live if live is not None and live.job.id == job_id else None

    def interrupt(self, job_id: str | None = None) -> bool:
        """Interrupt the running job (only if it is `job_id`, when given)."""
        live = self.live
        if live is None or (job_id is not None and live.job.id != job_id):
            return False
        live.interrupted = True
        return True

    def skip(self, job_id: str) -> bool:
        """Skip the image the running job `job_id` is making, if it runs here (A1111's skip)."""
        live = self.live
        if live is None or live.job.id != job_id:
            return False
        live.skipped = True
        return True

    def cancel(self, job_ids: list[str] | None = None) -> list[str]:
        """Cancel pending jobs (all for None); returns those cancelled."""
        cancelled = self.store.cancel(job_ids)
        for job_id in cancelled:
            self._resolve(job_id)
        if cancelled:
            self.on_change()
        return cancelled

    def _loop(self) -> None:
        while not self._stopping:
            job = self.store.claim()
            if job is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            self._run(job)

    def begin(self, job: Job) -> Live:
        """The live record of a job starting to run here."""
        return Live(job)

    def _run(self, job: Job) -> None:
        self.live = live = self.begin(job)
        self.on_change()
        try:
            outcome = self.runners[job.kind](job, live)
        except Interrupted:
            outcome = Outcome(CANCELLED, {}, "interrupted")
        except Exception as e:  # a failed job must not stop the queue
            log.exception("job %s failed", job.id)
            outcome = Outcome(FAILED, {}, f"{type(e).__name__}: {e}")
        if self._stopping and live.interrupted:
            outcome = Outcome(FAILED, outcome.result, SHUTDOWN_ERROR)
        self.live = None
        if live.lost:  # a shared queue handed the job on (or will): another worker records its outcome
            log.warning("job %s: this worker lost its lease; stopped, its outcome is not recorded", job.id)
        else:
            self.store.finish(job.id, outcome.state, outcome.result, outcome.error)
        self._resolve(job.id)
        self.on_change()

    def _resolve(self, job_id: str) -> None:
        job = self.store.get(job_id)
        with self._wake:
            waiters = self._waiters.pop(job_id, [])
        for future in waiters:
            if job is not None and not future.done():
                future.set_result(job)
