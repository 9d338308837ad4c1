"""The job queue on PostgreSQL (`--queue postgresql://...`): many front ends and workers, one queue.

The same jobs and states as the SQLite `JobStore`, in a database every process reaches. Workers claim the
oldest pending job with `SELECT ... FOR UPDATE SKIP LOCKED` (no two claim the same row) and hold a lease they
renew from a thread and connection of their own; a job whose lease ran out (its worker died or stalled) goes
back to pending once and is failed with the reason the second time, so a job is never lost. A worker whose
renewal finds the lease gone, or that could not renew it in time, stops the job at its next step; its finish
counts only while it still holds the job (fencing), and stores the result's image files in the database in
the same transaction, so any front end serves them; uploaded inputs and request
images are stored when received, so any worker reads them. Workers advertise their loaded checkpoints
(`workers`) and prefer jobs for them within a bounded look-ahead, and store their running job's progress in
its row. Front ends learn of finished jobs, /ws messages and interrupts through LISTEN/NOTIFY (a preview too
large for a notification goes through `previews`). The schema is created and migrated here, versioned in
`sdlab_schema`.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import psycopg
from psycopg.rows import dict_row

from sdlab.server.jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    PENDING,
    RUNNING,
    Job,
    Live,
    QueueFull,
    Runner,
    Worker,
    log,
)
from sdlab.server.paths import Folders, confined
from sdlab.server.preview import PNG, PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, latent_preview, png_base64
from sdlab.server.state import Events, Message

SCHEMA_VERSION = 3
# version -> the SQL that brings the previous version to it; applied in order, each in one transaction
MIGRATIONS = {
    1: """
CREATE TABLE jobs (
    number BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    request JSONB NOT NULL,
    state TEXT NOT NULL,
    result JSONB,
    error TEXT,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    worker TEXT,
    lease_until TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    interrupt BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX jobs_by_state ON jobs (state, number);
CREATE TABLE files (
    type TEXT NOT NULL,
    subfolder TEXT NOT NULL,
    filename TEXT NOT NULL,
    job TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (type, subfolder, filename)
);
CREATE INDEX files_by_job ON files (job);
""",
    2: """
ALTER TABLE jobs ADD COLUMN model TEXT;
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    models TEXT[] NOT NULL,
    heartbeat TIMESTAMPTZ NOT NULL
);
""",
    3: """
ALTER TABLE jobs ADD COLUMN progress JSONB;
CREATE TABLE previews (
    id BIGSERIAL PRIMARY KEY,
    data BYTEA NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
""",
}
COLUMNS = "id, number, kind, request, state, result, error, created, started, finished"
MAX_ATTEMPTS = 2  # a job whose worker died is retried once, then failed
LEASE_ERROR = "its worker stopped answering (lease expired) on both attempts"
INTERRUPTED_LEASE_ERROR = "interrupted; its worker stopped answering (lease expired) before it stopped"
QUEUE, DONE_CHANNEL, EVENTS, INTERRUPT = "sdlab_queue", "sdlab_done", "sdlab_events", "sdlab_interrupt"
SKIP = "sdlab_skip"  # payload: the id of a running job whose current image a client skips (A1111's /skip)
MAX_NOTIFY = 7900  # PostgreSQL's NOTIFY payload limit is 8000 bytes
# A worker takes, among the LOOK_AHEAD oldest pending jobs, the oldest whose model it has loaded; a job that
# has waited PREFER_WAIT_S counts as preferred by every worker, so none waits on preference longer than that.
LOOK_AHEAD, PREFER_WAIT_S = 8, 30.0
# A worker renews its lease RENEWALS_PER_LEASE times per lease period; a job whose lease was last renewed
# (request sent) more than HOLD_FRACTION of a lease ago stops at its next step: one missed renewal is
# tolerated, and the database hands the job on no sooner than a whole lease after that renewal.
RENEWALS_PER_LEASE, HOLD_FRACTION = 3, 5 / 6


def is_queue_url(value: str | None) -> bool:
    """Whether `--queue` names a PostgreSQL server (otherwise the embedded SQLite queue is used)."""
    return bool(value) and value.startswith(("postgresql://", "postgres://"))


def connect(url: str) -> psycopg.Connection:
    """An autocommit connection returning rows as dicts."""
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def migrate(db: psycopg.Connection) -> int:
    """Create or upgrade the schema to SCHEMA_VERSION (one process at a time); returns the version."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(7860)")
        db.execute("CREATE TABLE IF NOT EXISTS sdlab_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM sdlab_schema").fetchone()
        version = 0 if row is None else row["version"]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the queue database has schema {version}; this sdlab knows {SCHEMA_VERSION}")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            db.execute(MIGRATIONS[step])
        if row is None:
            db.execute("INSERT INTO sdlab_schema VALUES (%s)", (SCHEMA_VERSION,))
        else:
            db.execute("UPDATE sdlab_schema SET version = %s", (SCHEMA_VERSION,))
    return SCHEMA_VERSION


class PgJobStore:
    """`JobStore`'s methods on PostgreSQL, plus leases, stored result files and notifications."""

    def __init__(self, url: str, max_pending: int, folders: Folders, lease_s: float = 30.0) -> None:
        self.url, self.max_pending, self.folders, self.lease_s = url, max_pending, folders, lease_s
        self.worker_id = f"{uuid.uuid4().hex[:12]}"
        self.device = "cpu"  # what a worker advertises in the workers table
        self.models_held: Callable[[], list[str]] = list  # the checkpoints a worker has loaded
        self.held: list[str] = []  # as of its last claim
        self.claimed_at = 0.0  # time.monotonic() when its last claim was sent
        self._lock, self._lease_lock = threading.Lock(), threading.Lock()
        self._lease_db: psycopg.Connection | None = None  # renewals' own connection, opened when first used
        try:
            self._db = connect(url)
        except psycopg.OperationalError as e:  # a command-line error: one line (an OSError), no traceback
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConnectionError(f"--queue: cannot reach the PostgreSQL queue: {reason}") from e
        migrate(self._db)

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self._lock, self._db.transaction():
            yield self._db

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def recover(self) -> list[str]:
        """Re-queue (once) or fail the jobs whose worker's lease ran out; returns the ids failed."""
        return self.expire()

    def expire(self) -> list[str]:
        """Jobs running under an expired lease go back to pending, or end: cancelled when a client had asked
        to interrupt them (never restarted), failed after MAX_ATTEMPTS; the ids of the jobs that ended."""
        ends = "interrupt OR attempts >= %s"
        with self._transaction() as db:
            rows = db.execute(
                f"UPDATE jobs SET state = CASE WHEN interrupt THEN %s WHEN {ends} THEN %s ELSE %s END, "
                f"worker = NULL, error = CASE WHEN interrupt THEN %s WHEN {ends} THEN %s END, "
                f"finished = CASE WHEN {ends} THEN %s END, interrupt = FALSE "
                "WHERE state = %s AND lease_until < now() RETURNING id, state",
                (
                    CANCELLED,
                    MAX_ATTEMPTS,
                    FAILED,
                    PENDING,
                    INTERRUPTED_LEASE_ERROR,
                    MAX_ATTEMPTS,
                    LEASE_ERROR,
                    MAX_ATTEMPTS,
                    time.time(),
                    RUNNING,
                ),
            ).fetchall()
            failed = [r["id"] for r in rows if r["state"] in (FAILED, CANCELLED)]
            for job_id in failed:
                db.execute("SELECT pg_notify(%s, %s)", (DONE_CHANNEL, job_id))
            if len(failed) < len(rows):
                db.execute("SELECT pg_notify(%s, '')", (QUEUE,))
        if rows:
            log.warning("jobs whose worker stopped answering: %s", [(r["id"], r["state"]) for r in rows])
        return failed

    def add(self, kind: str, request: dict[str, Any], job_id: str | None = None) -> Job:
        """Queue a job at the back and wake a worker; QueueFull when `max_pending` jobs already wait."""
        with self._transaction() as db:
            (pending,) = (
                db.execute("SELECT COUNT(*) FROM jobs WHERE state = %s", (PENDING,)).fetchone().values()
            )
            if pending >= self.max_pending:
                raise QueueFull(f"the queue is full ({pending} jobs waiting)")
            row = db.execute(
                "INSERT INTO jobs (id, kind, request, state, created, model) "
                f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
                (
                    job_id or str(uuid.uuid4()),
                    kind,
                    json.dumps(request),
                    PENDING,
                    time.time(),
                    job_model(request),
                ),
            ).fetchone()
            db.execute("SELECT pg_notify(%s, %s)", (QUEUE, row["id"]))
        return Job(**row)

    def claim(self) -> Job | None:
        """Lease a pending job no other worker holds (None when nothing waits): the oldest, unless one of the
        LOOK_AHEAD oldest needs a checkpoint this worker has loaded (see PREFER_WAIT_S)."""
        self.expire()
        self.held = self.models_held()
        with self._transaction() as db:
            self.claimed_at = time.monotonic()
            row = db.execute(
                f"UPDATE jobs SET state = %s, started = %s, worker = %s, attempts = attempts + 1, "
                f"lease_until = now() + %s * interval '1 second' WHERE number = (SELECT number FROM jobs "
                f"WHERE number IN (SELECT number FROM jobs WHERE state = %s ORDER BY number LIMIT %s) "
                f"AND state = %s ORDER BY ((model = ANY(%s)) IS TRUE OR created < %s) DESC, number "
                f"LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}",
                (RUNNING, time.time(), self.worker_id, self.lease_s, PENDING, LOOK_AHEAD, PENDING, self.held)
                + (time.time() - PREFER_WAIT_S,),
            ).fetchone()
        return None if row is None else Job(**row)

    def heartbeat(self) -> None:
        """Record this worker in the workers table: its host, device and loaded checkpoints, now."""
        self._query(
            "INSERT INTO workers VALUES (%s, %s, %s, %s, now()) ON CONFLICT (id) DO UPDATE SET "
            "models = EXCLUDED.models, heartbeat = EXCLUDED.heartbeat RETURNING id",
            (self.worker_id, socket.gethostname(), self.device, self.held),
        )

    def renew(self, job_ids: list[str]) -> dict[str, bool]:
        """Extend this worker's leases on job_ids, on a connection of its own (a job's thread may be using
        the other); those it still holds -> whether a client asked to interrupt them."""
        with self._lease_lock:
            if self._lease_db is None or self._lease_db.closed:
                self._lease_db = connect(self.url)
            rows = self._lease_db.execute(
                "UPDATE jobs SET lease_until = now() + %s * interval '1 second' "
                "WHERE id = ANY(%s) AND worker = %s AND state = %s RETURNING id, interrupt",
                (self.lease_s, job_ids, self.worker_id, RUNNING),
            ).fetchall()
        return {r["id"]: r["interrupt"] for r in rows}

    def report(self, progress: dict[str, dict[str, Any]]) -> None:
        """Store the progress of this worker's running jobs (job id -> progress) for the front ends."""
        if progress:
            self._query(
                "UPDATE jobs SET progress = %s::jsonb -> id "
                "WHERE id = ANY(%s) AND worker = %s AND state = %s RETURNING id",
                (json.dumps(progress), list(progress), self.worker_id, RUNNING),
            )

    def running(self) -> list[Live]:
        """The running jobs whose workers reported progress, latest started first, as `Live` records."""
        rows = self._query(
            f"SELECT {COLUMNS}, progress FROM jobs WHERE state = %s AND progress IS NOT NULL "
            "ORDER BY started DESC",
            (RUNNING,),
        )
        return [Live(Job(**{k: v for k, v in r.items() if k != "progress"}), **r["progress"]) for r in rows]

    def put_preview(self, data: bytes) -> int:
        """Store a preview too large for a notification (dropping those over a minute old); its id."""
        with self._transaction() as db:
            db.execute("DELETE FROM previews WHERE created < now() - interval '1 minute'")
            return db.execute("INSERT INTO previews (data) VALUES (%s) RETURNING id", (data,)).fetchone()[
                "id"
            ]

    def read_preview(self, preview_id: int) -> bytes | None:
        """A stored preview, or None once dropped."""
        rows = self._query("SELECT data FROM previews WHERE id = %s", (preview_id,))
        return bytes(rows[0]["data"]) if rows else None

    def finish(self, job_id: str, state: str, result: dict[str, Any], error: str | None) -> None:
        """Record the end of a job this worker still holds, with its image files; a job whose lease was
        lost meanwhile (and went to another worker) is left alone."""
        with self._transaction() as db:
            held = db.execute(
                "SELECT 1 FROM jobs WHERE id = %s AND state = %s AND worker = %s FOR UPDATE",
                (job_id, RUNNING, self.worker_id),
            ).fetchone()
            if held is None:
                log.warning("job %s: lease lost before it finished; its result is dropped", job_id)
                return
            for ref in file_refs(result):
                self._store_file(db, job_id, ref)
            db.execute(
                "UPDATE jobs SET state = %s, result = %s, error = %s, finished = %s, worker = NULL "
                "WHERE id = %s",
                (state, json.dumps(result), error, time.time(), job_id),
            )
            db.execute("SELECT pg_notify(%s, %s)", (DONE_CHANNEL, job_id))

    def _store_file(self, db: psycopg.Connection, job_id: str, ref: dict[str, Any]) -> None:
        """Store one result file, renamed (in ref too) when another job's file has its name."""
        path = confined(self.folders.by_type(ref["type"]), ref.get("subfolder", ""), ref["filename"])
        data = path.read_bytes()
        name = PurePosixPath(ref["filename"])
        for candidate in (
            name.name,
            f"{name.stem}-{job_id[:8]}{name.suffix}",
            f"{name.stem}-{job_id}{name.suffix}",
        ):
            stored = db.execute(
                "INSERT INTO files (type, subfolder, filename, job, data) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (ref["type"], ref.get("subfolder", ""), candidate, job_id, data),
            ).fetchone()
            if stored is not None:
                ref["filename"] = candidate
                return
        raise RuntimeError(f"job {job_id}: no free name for {ref['filename']}")

    def put_file(self, kind: str, subfolder: str, filename: str, data: bytes, job: str = "") -> None:
        """Store (or replace) a file every process reads: an uploaded input, a queued job's image (deleted
        with that job)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO files (type, subfolder, filename, job, data) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (type, subfolder, filename) DO UPDATE SET job = EXCLUDED.job, "
                "data = EXCLUDED.data",
                (kind, subfolder, filename, job, data),
            )

    def read_file(self, kind: str, subfolder: str, filename: str) -> bytes | None:
        """The bytes of a stored result file, or None."""
        rows = self._query(
            "SELECT data FROM files WHERE type = %s AND subfolder = %s AND filename = %s",
            (kind, subfolder, filename),
        )
        return bytes(rows[0]["data"]) if rows else None

    def request_interrupt(self, job_id: str | None = None) -> bool:
        """Ask the worker running `job_id` (any running job for None) to stop it; whether one was running."""
        chosen = "" if job_id is None else " AND id = %s"
        with self._transaction() as db:
            rows = db.execute(
                f"UPDATE jobs SET interrupt = TRUE WHERE state = %s{chosen} RETURNING id",
                (RUNNING, *([job_id] if job_id else [])),
            ).fetchall()
            for row in rows:
                db.execute("SELECT pg_notify(%s, %s)", (INTERRUPT, row["id"]))
        return bool(rows)

    def cancel(self, job_ids: list[str] | None = None) -> list[str]:
        """Cancel the given pending jobs (all pending jobs for None); returns the ids cancelled."""
        chosen = "" if job_ids is None else " AND id = ANY(%s)"
        with self._transaction() as db:
            rows = db.execute(
                f"UPDATE jobs SET state = %s, error = 'cancelled', finished = %s WHERE state = %s{chosen} "
                "RETURNING id",
                (CANCELLED, time.time(), PENDING, *([job_ids] if job_ids is not None else [])),
            ).fetchall()
            for row in rows:
                db.execute("SELECT pg_notify(%s, %s)", (DONE_CHANNEL, row["id"]))
        return [r["id"] for r in rows]

    def forget(self, job_ids: list[str] | None = None, kind: str | None = None) -> list[str]:
        """Delete finished jobs (all of them for None), of one kind if given, with their stored files."""
        chosen = "" if job_ids is None else " AND id = ANY(%s)"
        args = (list(FINISHED), *([job_ids] if job_ids is not None else []), *([kind] if kind else []))
        with self._transaction() as db:
            rows = db.execute(
                f"DELETE FROM jobs WHERE state = ANY(%s){chosen}"
                + (" AND kind = %s" if kind else "")
                + " RETURNING id",
                args,
            ).fetchall()
            ids = [r["id"] for r in rows]
            db.execute("DELETE FROM files WHERE job = ANY(%s)", (ids,))
        return ids

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        rows = self._query(f"SELECT {COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        return Job(**rows[0]) if rows else None

    def jobs(self, states: tuple[str, ...], kind: str | None = None, limit: int = -1) -> list[Job]:
        """Jobs in the given states, oldest first (the last `limit` of them when limit >= 0)."""
        query = f"SELECT {COLUMNS} FROM jobs WHERE state = ANY(%s)" + (" AND kind = %s" if kind else "")
        query = f"SELECT * FROM ({query} ORDER BY number DESC LIMIT %s) AS last ORDER BY number"
        args = (list(states), *([kind] if kind else []), None if limit < 0 else limit)
        return [Job(**r) for r in self._query(query, args)]

    def count(self, states: tuple[str, ...]) -> int:
        """How many jobs are in the given states."""
        return self._query("SELECT COUNT(*) AS n FROM jobs WHERE state = ANY(%s)", (list(states),))[0]["n"]

    def notify(self, channel: str, payload: str) -> None:
        """Send a notification to every process listening on channel."""
        self._query("SELECT pg_notify(%s, %s)", (channel, payload))

    def close(self) -> None:
        """Leave the workers table and close the connections."""
        with self._lock:
            self._db.execute("DELETE FROM workers WHERE id = %s", (self.worker_id,))
            self._db.close()
        with self._lease_lock:
            if self._lease_db is not None:
                self._lease_db.close()


def job_model(request: dict[str, Any]) -> str | None:
    """The checkpoint a job loads (A1111: its checkpoint; ComfyUI: the first loader's), for claims."""
    if isinstance(request.get("checkpoint"), str):
        return request["checkpoint"]
    nodes = request.get("prompt")
    for node in nodes.values() if isinstance(nodes, dict) else ():
        name = (node.get("inputs") or {}).get("ckpt_name") if isinstance(node, dict) else None
        if isinstance(name, str):
            return name
    return None


def file_refs(value: Any) -> Iterator[dict[str, Any]]:
    """The `{"filename", "subfolder", "type"}` file references anywhere in a job's result."""
    if isinstance(value, dict):
        if isinstance(value.get("filename"), str) and value.get("type") in ("output", "temp", "input"):
            yield value
            return
        for item in value.values():
            yield from file_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from file_refs(item)


def fetch_file(store: PgJobStore, folders: Folders, kind: str, subfolder: str, filename: str) -> Path:
    """The local path of a file of the given type; a file another process made or received is written there
    from the queue database first (an input every time it differs: a later upload may have replaced it)."""
    path = confined(folders.by_type(kind), subfolder, filename)
    if kind == "input" or not path.exists():
        data = store.read_file(kind, subfolder, filename)
        if data is not None and not (path.is_file() and path.read_bytes() == data):
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            partial.write_bytes(data)
            partial.replace(path)
    return path


class Listener:
    """A thread on its own connection: LISTENs on channels, calls `on_notify(channel, payload)` for each
    notification and `tick()` at least every `tick_s` seconds (lease renewal, polling for lost messages)."""

    def __init__(
        self,
        url: str,
        channels: tuple[str, ...],
        on_notify: Callable[[str, str], None],
        tick: Callable[[], None],
        tick_s: float = 1.0,
    ) -> None:
        self.url, self.channels, self.on_notify, self.tick, self.tick_s = (
            url,
            channels,
            on_notify,
            tick,
            tick_s,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdlab-listen", daemon=True)

    def start(self) -> None:
        """Start listening."""
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (within one tick)."""
        self._stop.set()
        self._thread.join(self.tick_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.url) as db:
                    for channel in self.channels:
                        db.execute(f"LISTEN {channel}")
                    self._loop(db)
            except psycopg.Error as e:  # the database went away: retry, the queue state is in the database
                log.warning("queue listener: %s; reconnecting", e)
                self._stop.wait(1.0)

    def _loop(self, db: psycopg.Connection) -> None:
        last = 0.0
        while not self._stop.is_set():
            for note in db.notifies(timeout=self.tick_s, stop_after=64):
                self.on_notify(note.channel, note.payload)
            if time.monotonic() - last >= self.tick_s:
                last = time.monotonic()
                try:
                    self.tick()
                except Exception:  # a failed tick must not end the listener
                    log.exception("queue listener tick failed")


def encode_event(message: dict[str, Any] | bytes, client_id: str | None) -> str | None:
    """A /ws message as a NOTIFY payload (binary previews base64), or None when it is too large to send."""
    body = {"json": message} if isinstance(message, dict) else {"bytes": base64.b64encode(message).decode()}
    payload = json.dumps({"client": client_id, **body})
    return payload if len(payload) <= MAX_NOTIFY else None


def decode_event(payload: str, store: PgJobStore) -> tuple[dict[str, Any] | bytes | None, str | None]:
    """The message and client id of a payload from `PgEvents.publish` (None: a stored preview since
    dropped)."""
    body = json.loads(payload)
    if "preview" in body:
        return store.read_preview(body["preview"]), body["client"]
    message = body["json"] if "json" in body else base64.b64decode(body["bytes"])
    return message, body["client"]


def for_client(
    message: dict[str, Any] | bytes, client_id: str | None, events: Events
) -> dict[str, Any] | bytes:
    """A worker's message as a front end's client gets it: a preview with metadata (workers always send
    those) becomes a plain one for a client that did not announce `supports_preview_metadata` here."""
    if not isinstance(message, bytes) or client_id is None:
        return message
    if events.feature(client_id, "supports_preview_metadata"):
        return message
    kind, size = struct.unpack(">II", message[:8])
    if kind != PREVIEW_IMAGE_WITH_METADATA:
        return message
    return struct.pack(">II", PREVIEW_IMAGE, PNG) + message[8 + size :]


def live_progress(live: Live | None) -> dict[str, dict[str, Any]]:
    """A worker's running job -> its progress as stored for the front ends, with a preview of its latents."""
    if live is None:
        return {}
    preview = latent_preview(live.latent, live.latent_format)
    fields = ("started", "step", "total", "job_no", "job_count", "node")
    progress = {f: getattr(live, f) for f in fields}
    return {live.job.id: progress | {"preview": None if preview is None else png_base64(preview)}}


class FrontEnd(Worker):
    """A `Worker` that runs no job (`sdlab serve --queue URL --workers 0`): it queues jobs for the workers,
    resolves waiters when any worker finishes a job, and forwards interrupts and skips to the worker running
    it."""

    @property
    def live(self) -> Live | None:
        """The running job of one of this front end's waiting clients (else the latest started), as its
        worker last reported it (A1111's /progress)."""
        with self._wake:
            mine = set(self._waiters)
        running = self.store.running()
        return next((live for live in running if live.job.id in mine), running[0] if running else None)

    @live.setter
    def live(self, value: Live | None) -> None:
        """Ignored: a front end runs no job (`Worker.__init__` sets None)."""

    def live_of(self, job_id: str) -> Live | None:
        """A job's progress as its worker last reported it (None unless it runs)."""
        return next((live for live in self.store.running() if live.job.id == job_id), None)

    def start(self) -> None:
        """Nothing to run here; the listener (see `serve_queue`) resolves waiters."""

    def stop(self, timeout: float = 30.0) -> None:
        """Nothing to stop."""

    def interrupt(self, job_id: str | None = None) -> bool:
        """Ask the worker running the job (any running job for None) to stop it."""
        assert isinstance(self.store, PgJobStore)
        return self.store.request_interrupt(job_id)

    def skip(self, job_id: str) -> bool:
        """Ask the worker running the job to skip the image it is making (a notification only: a worker
        reconnecting to the database meanwhile misses it)."""
        assert isinstance(self.store, PgJobStore)
        self.store.notify(SKIP, job_id)
        return True

    def poll(self) -> None:
        """Resolve waiters whose jobs finished without a notification reaching this process."""
        with self._wake:
            waiting = list(self._waiters)
        for job_id in waiting:
            job = self.store.get(job_id)
            if job is None or job.state in FINISHED:
                self._resolve(job_id)


class PgWorker(Worker):
    """A `Worker` on the PostgreSQL queue: it holds a lease on the job it runs, renewed by its `LeaseKeeper`;
    a job whose lease is lost (taken over, or not renewed in time) stops at its next step, unrecorded."""

    def __init__(self, store: PgJobStore, runners: dict[str, Runner], on_change: Callable[[], None]) -> None:
        super().__init__(store, runners, on_change)
        self.keeper = LeaseKeeper(store, self)

    def begin(self, job: Job) -> Live:
        """The live record of a job just claimed, held until HOLD_FRACTION of a lease after the claim."""
        assert isinstance(self.store, PgJobStore)
        return Live(job, hold_until=self.store.claimed_at + HOLD_FRACTION * self.store.lease_s)

    def start(self) -> None:
        """Start the worker thread and the lease renewal."""
        super().start()
        self.keeper.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker thread (its running job too), then the lease renewal."""
        super().stop(timeout)
        self.keeper.stop()


class LeaseKeeper:
    """A worker's lease renewal: a thread that every lease/RENEWALS_PER_LEASE seconds extends the lease of the
    job the worker runs, through the store's renewal connection, so neither the job's thread nor the store's
    main connection can delay it. When the job is no longer this worker's (its lease expired and the job was
    re-queued or taken over), it marks the job lost at once: the runner stops at its next step."""

    def __init__(self, store: PgJobStore, worker: Worker) -> None:
        self.store, self.worker = store, worker
        self.period = store.lease_s / RENEWALS_PER_LEASE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdlab-lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the running job then stops by its `hold_until`)."""
        self._stop.set()
        self._thread.join(self.period + 5)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + self.period, time.monotonic())  # a fixed rate: one slow renewal delays no other
            live = self.worker.live
            if live is not None and not live.lost:
                self.renew(live)

    def renew(self, live: Live) -> None:
        """Renew the lease of the job `live` records, or mark it lost (and interrupt it when asked)."""
        sent = time.monotonic()
        try:
            held = self.store.renew([live.job.id])
        except psycopg.Error as e:  # the database is unreachable: the job stops by its hold_until if it lasts
            log.warning("lease renewal failed: %s", e)
            return
        if live.job.id not in held:
            live.lost = True
            log.warning("job %s: its lease expired and the queue took it back; stopping it", live.job.id)
            return
        live.hold_until = sent + HOLD_FRACTION * self.store.lease_s
        live.interrupted = live.interrupted or held[live.job.id]


def queue_listener(server: Any) -> Listener:
    """The listener of a process on the PostgreSQL queue: wakes its worker for new jobs, stops the job a
    client interrupted and skips the image a client skipped; records its heartbeat and its running job's
    progress (leases are renewed by the worker's `LeaseKeeper`); in a front end, resolves waiters and
    relays workers' /ws messages to its WebSocket clients."""
    store, worker = server.store, server.worker
    front_end = isinstance(worker, FrontEnd)

    def on_notify(channel: str, payload: str) -> None:
        if channel == DONE_CHANNEL:
            worker._resolve(payload)
            server.queue_changed()
        elif channel == EVENTS:
            message, client_id = decode_event(payload, store)
            if message is not None:
                server.events.publish(for_client(message, client_id, server.events), client_id)
        elif channel == INTERRUPT:
            worker.interrupt(payload)
        elif channel == SKIP:
            worker.skip(payload)
        elif channel == QUEUE:
            with worker._wake:
                worker._wake.notify()

    def tick() -> None:
        if front_end:
            worker.poll()
            store.expire()
            return
        store.heartbeat()
        store.report(live_progress(worker.live))

    store.models_held = server.models.loaded
    channels = (DONE_CHANNEL, EVENTS) if front_end else (QUEUE, INTERRUPT, SKIP)
    return Listener(store.url, channels, on_notify, tick)


class PgEvents(Events):
    """A worker's /ws messages, sent through NOTIFY to every front end (each delivers them to its clients;
    a preview too large for a notification is stored and the notification names it)."""

    def __init__(self, store: PgJobStore) -> None:
        super().__init__()
        self.store = store

    def connected(self, client_id: str) -> bool:
        """Always: the client may be connected to any front end (those it is not on drop its messages)."""
        return True

    def feature(self, client_id: str, name: str) -> bool:
        """Always: the client negotiated with its front end, which downgrades what it does not support."""
        return True

    def publish(self, message: Message, client_id: str | None = None) -> None:
        """Send to the client (all for None) through whichever front end it is connected to."""
        payload = encode_event(message, client_id)
        if payload is None and isinstance(message, bytes):
            payload = json.dumps({"client": client_id, "preview": self.store.put_preview(message)})
        if payload is not None:
            self.store.notify(EVENTS, payload)


def open_queue(settings: Any) -> tuple[PgJobStore, Events, type[Worker]]:
    """The store, events and worker class of a process on `settings.queue`: a front end (`workers == 0`)
    keeps its WebSocket clients' events local, a worker sends them to the front ends."""
    store = PgJobStore(settings.queue, settings.max_queue, settings.folders, settings.lease_s)
    if settings.workers == 0:
        return store, Events(), FrontEnd
    return store, PgEvents(store), PgWorker
