"""What the routes of both APIs share: folders, models, the job queue and its worker, WebSocket events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlab.devices import Placement
from sdlab.images import DEFAULT_LIMITS, ImageLimits
from sdlab.server.jobs import PENDING, RUNNING, Job, JobStore, Live, Outcome, Worker, log
from sdlab.server.library import Library, ModelCache
from sdlab.server.nodes import Env
from sdlab.server.paths import Folders, confined

# images of one request: A1111's batch_size x n_iter (its sliders stop at 8 x 100), extras and detect inputs
MAX_JOB_IMAGES = 800

Message = dict[str, Any] | bytes


@dataclass(frozen=True)
class Settings:
    """How a server is set up (from `sdlab serve`'s options)."""

    folders: Folders
    api_key: str | None = None
    max_queue: int = 100  # pending jobs; more get HTTP 429
    # Host names served without an API key besides the loopback ones (`sdlab serve --allowed-hosts`)
    allowed_hosts: tuple[str, ...] = ()
    image_limits: ImageLimits = DEFAULT_LIMITS  # every uploaded or posted image (`--max-image-pixels/-bytes`)
    # live previews over ComfyUI's /ws: "none" (ComfyUI's default), "auto" or "latent2rgb" (the same here:
    # sdlab has no TAESD, which "auto" would prefer)
    preview_method: str = "none"
    ui: str = "sdlab"  # the page at `/`: sdlab's web UI, or "comfy" for ComfyUI's frontend (also at /comfy/)
    front_end_root: Path | None = None  # a ComfyUI frontend build (None: the installed frontend package)
    queue: str | None = None  # a postgresql:// URL many processes share (None: SQLite in the state folder)
    workers: int = 1  # job-running threads here; 0: a front end of the `queue` (workers elsewhere)
    lease_s: float = 30.0  # how long a worker holds a job on `queue` without renewing its lease
    placement: Placement = Placement()  # device, dtype, offload and attention of loaded models
    extra_model_paths: tuple[tuple[str, Path], ...] = ()  # (kind, folder) from extra_model_paths.yaml


class Events:
    """WebSocket messages published from any thread, delivered on each subscriber's event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[tuple[str, asyncio.Queue[Message], asyncio.AbstractEventLoop]] = []
        self._features: dict[str, dict[str, Any]] = {}  # client id -> its /ws feature flags

    def subscribe(self, client_id: str) -> asyncio.Queue[Message]:
        """A queue of the messages for client_id (call on the event loop)."""
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=1024)
        with self._lock:
            self._subscribers.append((client_id, queue, asyncio.get_running_loop()))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Message]) -> None:
        """Stop delivering to a queue from `subscribe`."""
        with self._lock:
            gone = [s[0] for s in self._subscribers if s[1] is queue]
            self._subscribers = [s for s in self._subscribers if s[1] is not queue]
            for client_id in gone:
                if not any(s[0] == client_id for s in self._subscribers):
                    self._features.pop(client_id, None)

    def set_features(self, client_id: str, flags: dict[str, Any]) -> None:
        """Record the feature flags a client announced on its WebSocket."""
        with self._lock:
            self._features[client_id] = flags

    def feature(self, client_id: str, name: str) -> bool:
        """Whether a client announced a feature (flag value True)."""
        with self._lock:
            return self._features.get(client_id, {}).get(name) is True

    def connected(self, client_id: str) -> bool:
        """Whether a client with this id has a WebSocket open."""
        with self._lock:
            return any(s[0] == client_id for s in self._subscribers)

    def publish(self, message: Message, client_id: str | None = None) -> None:
        """Send to one client, or to all for client_id None; a client too slow to keep up loses messages."""
        with self._lock:
            targets = [s for s in self._subscribers if client_id is None or s[0] == client_id]
        for _, queue, loop in targets:
            try:
                loop.call_soon_threadsafe(_offer, queue, message)
            except RuntimeError:  # its event loop has closed: the server is stopping
                self.unsubscribe(queue)


def _offer(queue: asyncio.Queue[Message], message: Message) -> None:
    if not queue.full():
        queue.put_nowait(message)


@dataclass
class Server:
    """The shared state of one running server."""

    settings: Settings
    library: Library
    models: ModelCache
    store: JobStore
    events: Events = field(default_factory=Events)
    options: dict[str, Any] = field(default_factory=dict)  # A1111 options settable over the API
    worker: Worker = field(init=False)
    listener: Any = None  # on a PostgreSQL queue: the thread relaying notifications (queue_pg.Listener)

    @classmethod
    def open(cls, settings: Settings, runners: dict[str, Callable[[Server, Job, Live], Outcome]]) -> Server:
        """Create the folders, open the queue (failing jobs a crash left running) and the worker."""
        folders = settings.folders
        folders.create()
        library = Library(folders.models, settings.extra_model_paths)
        if settings.queue:
            from sdlab.server.queue_pg import open_queue, queue_listener

            store, events, worker_class = open_queue(settings)
        else:
            store, events, worker_class = JobStore(folders.database, settings.max_queue), Events(), Worker
        failed = store.recover()
        if failed:
            log.warning(
                "%d job(s) were running when the server stopped; marked failed: %s", len(failed), failed
            )
        server = cls(settings, library, ModelCache(library, placement=settings.placement), store, events)
        bound = {kind: _bind(run, server) for kind, run in runners.items()}
        server.worker = worker_class(store, bound, server.queue_changed)
        if settings.queue:
            server.listener = queue_listener(server)
        server.options = {
            "sd_model_checkpoint": next(iter(library.checkpoints()), None),
            "CLIP_stop_at_last_layers": 1,
        }
        return server

    def start(self) -> None:
        """Start running jobs (and relaying the shared queue's notifications)."""
        self.worker.start()
        if self.listener is not None:
            self.listener.start()

    def stop(self) -> None:
        """Stop the worker (failing its running job) and the listener; close the queue."""
        self.worker.stop()
        if self.listener is not None:
            self.listener.stop()
        self.store.close()

    def file(self, kind: str, subfolder: str, filename: str) -> Path:
        """The local path of a file of a ComfyUI type (output, input, temp); on a PostgreSQL queue a result
        file a worker elsewhere made is fetched from the database first."""
        if not self.settings.queue:
            return confined(self.folders.by_type(kind), subfolder, filename)
        from sdlab.server.queue_pg import fetch_file

        return fetch_file(self.store, self.folders, kind, subfolder, filename)

    def share_input(self, subfolder: str, filename: str, job_id: str = "") -> None:
        """On a PostgreSQL queue, store an input file just written here (an upload, a request's image, which
        goes with its job) in the database, so a worker or front end elsewhere reads it through `file`."""
        if self.settings.queue:
            data = confined(self.folders.inputs, subfolder, filename).read_bytes()
            self.store.put_file("input", subfolder, filename, data, job_id)

    @property
    def folders(self) -> Folders:
        """The server's folders."""
        return self.settings.folders

    def env(self, live: Live | None = None) -> Env:
        """What ComfyUI nodes may use, with the running job's live state."""
        return Env(self.library, self.models, self.folders, live, self.settings.image_limits, self.file)

    def queue_remaining(self) -> int:
        """Jobs pending or running."""
        return self.store.count((PENDING, RUNNING))

    def status(self) -> dict[str, Any]:
        """ComfyUI's queue status (the `status` WebSocket message's data)."""
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def queue_changed(self) -> None:
        """Tell every WebSocket client the new queue status."""
        self.events.publish({"type": "status", "data": self.status()})


def _bind(run: Callable[[Server, Job, Live], Outcome], server: Server) -> Callable[[Job, Live], Outcome]:
    return lambda job, live: run(server, job, live)
