"""Front ends and workers on one PostgreSQL queue as separate processes, and the issue-16 scale run on them
(shared by tests/test_queue_pg.py and bench/queue_scale.py).

The scale run: jobs alternate between ComfyUI (/ws opened first, /prompt, /history) and A1111
(/sdapi/v1/txt2img), and between the front ends, from many client threads. Once a fifth of the jobs is
submitted, a longer job is queued and the worker running it is killed with SIGKILL mid-sampling; at half, the
first front end is killed (its clients move to the other, resending a request it did not answer).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from PIL import Image
from test_server_api import MODEL, free_port, txt2img_workflow
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

LEASE_S = 3.0  # the processes' --lease: short, so a killed worker's job is retried within seconds


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server at server_url; its URL."""
    name = f"q{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def _wait_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 180  # five processes importing torch at once on 2 busy cores took over 90 s
    while True:
        try:
            httpx.get(url + "/queue", timeout=1)
            return
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.1)


@dataclass
class Cluster:
    """Running front ends (URLs, processes) and workers, each process with its own folders under root."""

    root: Path
    queue: str
    urls: list[str]
    fronts: list[subprocess.Popen]
    workers: list[subprocess.Popen]

    def worker_id(self, i: int) -> str | None:
        """The queue's id of worker i (from its log), or None before it started."""
        for line in (self.root / f"worker{i}" / "log").read_text().splitlines():
            if "worker id " in line:
                return line.rsplit("worker id ", 1)[1].split()[0]
        return None

    def worker_of(self, job_id: str) -> int:
        """The index of the worker holding a running job."""
        with psycopg.connect(self.queue) as db:
            (holder,) = db.execute("SELECT worker FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return next(i for i in range(len(self.workers)) if self.worker_id(i) == holder)


@contextmanager
def processes(
    root: Path, queue: str, front_ends: int, workers: int, serve_args: tuple[str, ...] = ()
) -> Iterator[Cluster]:
    """Front ends (`sdlab serve --workers 0`) and workers (`sdlab worker`) on queue, killed on exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        home = root / name
        args += ["--models-dir", str(root / "models"), "--queue", queue, "--lease", str(LEASE_S)]
        args += ["--outputs-dir", str(home / "outputs"), "--input-dir", str(home / "input")]
        args += ["--state-dir", str(home / "state"), "--threads", "1"]
        home.mkdir()
        with (home / "log").open("ab") as log:
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    try:
        ports = [free_port() for _ in range(front_ends)]
        serve = [sys.executable, "-m", "sdlab.server", "-q", *serve_args, "--workers", "0", "--port"]
        fronts = [start(f"front{i}", [*serve, str(p)]) for i, p in enumerate(ports)]
        worker = [sys.executable, "-m", "sdlab.cli", "worker", "--device", "cpu"]
        backs = [start(f"worker{i}", [*worker]) for i in range(workers)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, (url, proc) in enumerate(zip(urls, fronts)):
            _wait_up(url, proc, root / f"front{i}" / "log")
        yield Cluster(root, queue, urls, fronts, backs)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def messages_until_done(ws: Any, prompt_id: str, timeout: float = 60) -> set[tuple[str, str]]:
    """The (type, prompt_id) of the JSON /ws messages until the end of prompt_id's execution."""
    seen: set[tuple[str, str]] = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        message = ws.recv(timeout=timeout)
        if isinstance(message, bytes):
            continue
        parsed = json.loads(message)
        data = parsed.get("data", {})
        seen.add((parsed["type"], data.get("prompt_id")))
        if parsed["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return seen
    raise TimeoutError(f"no end of {prompt_id} on /ws")


@dataclass
class ScaleReport:
    """What a scale run found (ids shortened to 8 characters)."""

    jobs: int = 0  # job rows in the queue
    answered: int = 0  # client requests answered with a finished job (ComfyUI: its history; A1111: images)
    unanswered: list[str] = field(default_factory=list)  # requests never answered: lost
    kills: int = 0
    killed_job: str = ""  # the job whose worker was killed mid-sampling
    attempts: dict[str, int] = field(default_factory=dict)  # jobs claimed more than once -> claims
    failed: list[tuple[str, str]] = field(default_factory=list)  # (job, error)
    unfinished: list[str] = field(default_factory=list)  # jobs not done, failed or cancelled: lost
    duplicates: list[str] = field(default_factory=list)  # done jobs without exactly one stored image
    unreadable: int = 0  # stored images the surviving front end does not serve
    ws_progress: int = 0  # ComfyUI jobs whose progress reached their client's /ws
    ws_silent: list[str] = field(default_factory=list)  # ... that got no progress there, front end alive
    ws_cut: int = 0  # ... whose /ws front end was killed before the job ended
    wall: float = 0.0

    def lines(self) -> list[str]:
        """The report as printed by bench/queue_scale.py."""
        return [
            f"jobs {self.jobs}, answered {self.answered}, unanswered {len(self.unanswered)}",
            f"kills {self.kills}, retried {self.attempts}, failed {len(self.failed)} {self.failed}",
            f"duplicates {len(self.duplicates)}, lost {len(self.unanswered) + len(self.unfinished)}, "
            f"images unreadable through the live front end {self.unreadable}",
            f"/ws progress seen {self.ws_progress}, not seen {len(self.ws_silent)}, "
            f"cut by the front end's kill {self.ws_cut}",
            f"wall {self.wall:.1f} s, {self.jobs / self.wall:.2f} jobs/s",
        ]


def scale_run(cluster: Cluster, jobs: int, clients: int, steps: int = 2) -> ScaleReport:
    """Run `jobs` small jobs from `clients` threads on the cluster, killing a worker mid-job and the first
    front end on the way; what became of every request and job."""
    report, dead = ScaleReport(), set[str]()
    http = {url: httpx.Client(base_url=url, timeout=120) for url in cluster.urls}  # shared by the threads
    submitted, lock = itertools.count(1), threading.Lock()

    def live_url(i: int) -> str:  # jobs 4k, 4k+1 (A1111, ComfyUI) go to one front end, 4k+2, 4k+3 to the next
        urls = [u for u in cluster.urls if u not in dead]
        return urls[i // 2 % len(urls)]

    def client_job(i: int) -> None:
        n = next(submitted)
        if n == jobs // 5:
            kill_worker.set()
        if n == jobs // 2:
            killed.wait(120)
            dead.add(cluster.urls[0])
            cluster.fronts[0].kill()
            with lock:
                report.kills += 1
        answered = comfy_client(i) if i % 2 else a1111_client(i)
        with lock:
            report.answered += answered
            if not answered:
                report.unanswered.append(f"{'comfy' if i % 2 else 'a1111'} {i}")

    def comfy_client(i: int) -> bool:
        """Whether the job's history shows it finished (through a live front end)."""
        client_id = f"c{i}"
        body = {"prompt": txt2img_workflow(seed=i, steps=steps, prefix=f"c{i}"), "client_id": client_id}
        for _ in range(3):  # a front end killed before it answered: the other one
            url = live_url(i)
            try:
                with ws_connect(
                    url.replace("http", "ws") + f"/ws?clientId={client_id}", open_timeout=30
                ) as ws:
                    prompt_id = http[url].post("/prompt", json=body).json()["prompt_id"]
                    watch(ws, prompt_id, url)
                return history(i, prompt_id)
            except (httpx.TransportError, OSError):  # no answer: not accepted as far as the client knows
                time.sleep(0.2)
        return False

    def watch(ws: Any, prompt_id: str, url: str) -> None:
        try:
            seen = messages_until_done(ws, prompt_id, timeout=120)
        except (ConnectionClosed, TimeoutError) as e:
            with lock:
                if url in dead:
                    report.ws_cut += 1
                else:
                    report.ws_silent.append(f"{prompt_id[:8]}: {type(e).__name__}: {e}")
            return
        with lock:
            if ("progress", prompt_id) in seen:
                report.ws_progress += 1
            else:
                report.ws_silent.append(f"{prompt_id[:8]}: no progress message")

    def history(i: int, prompt_id: str) -> bool:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                entry = http[live_url(i)].get(f"/history/{prompt_id}").json()
            except httpx.TransportError:
                entry = {}
            if entry:
                return entry[prompt_id]["status"]["completed"] is not None
            time.sleep(0.1)
        return False

    def a1111_client(i: int) -> bool:
        body: dict[str, Any] = {"prompt": "q", "steps": steps, "width": 32, "height": 32, "seed": 10_000 + i}
        body |= {"save_images": True, "override_settings": {"sd_model_checkpoint": MODEL}}
        for _ in range(3):  # a request its front end did not answer (killed) is sent again to the other
            try:
                answer = http[live_url(i)].post("/sdapi/v1/txt2img", json=body)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            (image,) = answer.json()["images"]
            return Image.open(io.BytesIO(base64.b64decode(image))).size == (32, 32)
        return False

    kill_worker, killed = threading.Event(), threading.Event()

    def killer() -> None:
        kill_worker.wait()
        body = {"prompt": txt2img_workflow(seed=1, steps=100, prefix="killed")}
        answer = http[cluster.urls[-1]].post("/prompt", json=body)
        report.killed_job = answer.json()["prompt_id"]
        deadline = time.time() + 120
        while progress_step(cluster.queue, report.killed_job) < 1:  # sampling, reported each second
            if time.time() > deadline or _finished(cluster.queue, report.killed_job):
                killed.set()  # the front end is killed all the same; the report shows no killed worker
                return
            time.sleep(0.05)
        cluster.workers[cluster.worker_of(report.killed_job)].kill()  # mid-sampling
        with lock:
            report.kills += 1
        killed.set()

    start, since = time.perf_counter(), time.time()
    with ThreadPoolExecutor(clients + 1) as pool:
        kill = pool.submit(killer)
        list(pool.map(client_job, range(jobs)))
        kill.result()
    deadline = time.time() + 120
    while not _finished(cluster.queue, report.killed_job) and time.time() < deadline:
        time.sleep(0.1)
    report.wall = time.perf_counter() - start
    _tally(cluster, report, since)
    for client in http.values():
        client.close()
    return report


def progress_step(queue: str, job_id: str) -> int:
    """The sampling step a running job's worker last reported (0 before any)."""
    with psycopg.connect(queue) as db:
        row = db.execute("SELECT (progress->>'step')::int FROM jobs WHERE id = %s", (job_id,)).fetchone()
    return (row[0] or 0) if row else 0


def _finished(queue: str, job_id: str) -> bool:
    with psycopg.connect(queue) as db:
        (state,) = db.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()
    return state in ("done", "failed", "cancelled")


def _tally(cluster: Cluster, report: ScaleReport, since: float) -> None:
    """Fill the report from the rows of the jobs queued since `since` (time.time()) and the surviving front
    end's /view of their images."""
    with psycopg.connect(cluster.queue) as db:
        rows = db.execute(
            "SELECT id, state, error, attempts, (SELECT count(*) FROM files f WHERE f.job = j.id "
            "AND f.type <> 'input') FROM jobs j WHERE created >= %s",
            (since,),
        ).fetchall()
        refs = db.execute(
            "SELECT type, subfolder, filename FROM files WHERE type <> 'input' AND job = ANY(%s)",
            ([r[0] for r in rows],),
        ).fetchall()
    report.jobs = len(rows)
    report.attempts = {r[0][:8]: r[3] for r in rows if r[3] != 1}
    report.failed = [(r[0][:8], r[2]) for r in rows if r[1] == "failed"]
    report.unfinished = [r[0][:8] for r in rows if r[1] not in ("done", "failed", "cancelled")]
    report.duplicates = [r[0][:8] for r in rows if r[1] == "done" and r[4] != 1]
    live = [u for u, p in zip(cluster.urls, cluster.fronts) if p.poll() is None][0]
    with httpx.Client(base_url=live, timeout=60) as client:
        names = ("type", "subfolder", "filename")
        report.unreadable = sum(
            client.get("/view", params=dict(zip(names, ref, strict=True))).status_code != 200 for ref in refs
        )
