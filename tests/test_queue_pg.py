"""The job queue on PostgreSQL: the same store behaviour as SQLite, exclusive claims, leases retried once
then failed, a lost lease stopping its stale runner unrecorded, and front ends + workers as separate
processes (a paused worker's job taken over and completed once; the issue's scale run: 200 jobs through both
APIs from 16 clients, kill -9 of a worker mid-job and of a front end: every job finishes exactly once, none
lost, results readable through the surviving front end, /ws progress relayed), model-affine claims,
uploaded inputs and worker progress/previews across processes, and the SQLite state folder's one-server
lock."""

from __future__ import annotations

import base64
import io
import json
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from test_server_api import MODEL, check_skip, txt2img_workflow, wait_history, write_models

from sdlab.server.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    Job,
    JobStore,
    Live,
    Outcome,
    QueueFull,
)
from sdlab.server.paths import Folders

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'sdlab[queue]')")
from queue_cluster import (  # noqa: E402
    LEASE_S,
    Cluster,
    fresh_database,
    processes,
    progress_step,
    scale_run,
)

from sdlab.server.queue_pg import (  # noqa: E402
    INTERRUPTED_LEASE_ERROR,
    LEASE_ERROR,
    LOOK_AHEAD,
    SCHEMA_VERSION,
    PgJobStore,
    PgWorker,
    file_refs,
    migrate,
)


def folders(root: Path) -> Folders:
    result = Folders(None, root / "outputs", root / "input", root / "state")
    result.create()
    return result


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """`open_store(max_pending, lease_s)`: a new store on one queue, SQLite or PostgreSQL."""
    stores: list[Any] = []
    url = fresh_database(request.getfixturevalue("postgres_url")) if request.param == "postgresql" else None

    def open_(max_pending: int = 100, lease_s: float = 30.0) -> Any:
        if url is None:
            store = JobStore(tmp_path / "jobs.sqlite3", max_pending)
        else:
            store = PgJobStore(url, max_pending, folders(tmp_path / f"p{len(stores)}"), lease_s)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


def test_same_queue_behaviour_on_both_backends(open_store: Any) -> None:
    store = open_store(max_pending=2)
    first, second = store.add("comfy", {"n": 1}), store.add("a1111", {"n": 2})
    with pytest.raises(QueueFull):
        store.add("comfy", {"n": 3})
    assert [j.id for j in store.jobs((PENDING,))] == [first.id, second.id] and store.count((PENDING,)) == 2
    claimed = store.claim()
    assert claimed.id == first.id and claimed.request == {"n": 1} and store.get(first.id).state == RUNNING
    assert store.cancel() == [second.id] and store.get(second.id).state == CANCELLED
    store.finish(first.id, DONE, {"answer": 42}, None)
    done = store.get(first.id)
    assert (done.state, done.result, done.error) == (DONE, {"answer": 42}, None)
    assert done.finished >= done.started
    assert [j.id for j in store.jobs((DONE, CANCELLED), limit=1)] == [second.id]
    assert store.forget(kind="comfy") == [first.id] and store.get(first.id) is None
    assert store.claim() is None and store.count((PENDING, RUNNING)) == 0


def test_claims_are_exclusive_across_connections(postgres_url: str, tmp_path: Path) -> None:
    url = fresh_database(postgres_url)
    stores = [PgJobStore(url, 1000, folders(tmp_path / str(i))) for i in range(4)]
    added = [stores[0].add("noop", {"i": i}).id for i in range(120)]
    claimed: list[list[str]] = [[] for _ in stores]

    def drain(i: int) -> None:
        while (job := stores[i].claim()) is not None:
            claimed[i].append(job.id)
            stores[i].finish(job.id, DONE, {}, None)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [j for ids in claimed for j in ids]
    assert sorted(everything) == sorted(added)  # each claimed exactly once: none lost, none twice
    assert sum(1 for ids in claimed if ids) >= 2  # the claims really were concurrent
    assert stores[0].count((DONE,)) == 120
    assert migrate(stores[1]._db) == SCHEMA_VERSION  # migrating again is a no-op
    for store in stores:
        store.close()


def test_a_worker_prefers_jobs_for_its_loaded_model_within_the_look_ahead(
    postgres_url: str, tmp_path: Path
) -> None:
    url = fresh_database(postgres_url)
    has_a, has_b, fresh = (PgJobStore(url, 100, folders(tmp_path / n)) for n in "abc")
    has_a.models_held, has_b.models_held = (lambda: ["a.safetensors"]), (lambda: ["b.safetensors"])

    def add(model: str) -> str:  # an A1111 job and a ComfyUI one name their checkpoints differently
        if model == "a":
            return has_a.add("a1111", {"checkpoint": "a.safetensors"}).id
        prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}}}
        return has_a.add("comfy", {"prompt": prompt}).id

    b1, a1, b2, a2 = (add(m) for m in "baba")
    assert [has_a.claim().id, has_b.claim().id, fresh.claim().id] == [a1, b1, b2]  # fresh: plain FIFO
    assert has_b.claim().id == a2  # nothing of its own left: the oldest
    behind = [add("b") for _ in range(LOOK_AHEAD)] + [add("a")]
    assert has_a.claim().id == behind[0]  # its model's job is beyond the look-ahead: FIFO holds
    for store in (has_a, has_b):
        store.heartbeat()
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT id, models, heartbeat > now() - interval '1 minute' FROM workers"
        ).fetchall()
    assert sorted(rows) == sorted(
        [(has_a.worker_id, ["a.safetensors"], True), (has_b.worker_id, ["b.safetensors"], True)]
    )
    for store in (has_a, has_b, fresh):
        store.close()
    with psycopg.connect(url) as db:
        assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)  # a closed worker leaves


def test_expired_lease_is_retried_once_then_failed(postgres_url: str, tmp_path: Path) -> None:
    url = fresh_database(postgres_url)
    dead, other, third = (PgJobStore(url, 10, folders(tmp_path / n), lease_s=0.3) for n in "abc")
    job = dead.add("comfy", {})
    assert dead.claim().id == job.id
    assert other.claim() is None  # held: not claimable while the lease lasts
    time.sleep(0.5)
    retried = other.claim()  # the lease ran out: back to pending, claimed again
    assert retried.id == job.id and retried.state == RUNNING
    assert dead.renew([job.id]) == {}  # the first holder's renewal finds the job gone
    dead.finish(job.id, DONE, {"late": True}, None)  # and its finish is dropped (fencing)
    assert other.get(job.id).state == RUNNING and other.get(job.id).result is None
    assert other.renew([job.id]) == {job.id: False}
    time.sleep(0.5)
    assert third.expire() == [job.id] and third.claim() is None  # second loss: failed, not run a third time
    failed = third.get(job.id)
    assert (failed.state, failed.error) == (FAILED, LEASE_ERROR)
    interrupted = dead.add("comfy", {})  # a job a client interrupted whose worker then died: never restarted
    assert dead.claim().id == interrupted.id and other.request_interrupt(interrupted.id)
    assert dead.renew([interrupted.id]) == {interrupted.id: True}
    time.sleep(0.5)
    assert third.expire() == [interrupted.id] and third.claim() is None
    ended = third.get(interrupted.id)
    assert (ended.state, ended.error) == (CANCELLED, INTERRUPTED_LEASE_ERROR)
    for store in (dead, other, third):
        store.close()


def _lease_end(url: str, job_id: str) -> float:
    with psycopg.connect(url) as db:
        query = "SELECT extract(epoch FROM lease_until) FROM jobs WHERE id = %s"
        return float(db.execute(query, (job_id,)).fetchone()[0])


def test_a_worker_that_loses_its_lease_stops_at_once_and_records_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    url = fresh_database(postgres_url)
    lease = 2.0  # renewed every 2/3 s
    a, b = (PgJobStore(url, 10, folders(tmp_path / n), lease_s=lease) for n in "ab")
    stopped: dict[str, float] = {}  # job id -> when its runner on worker A stopped (time.time())

    def run(job: Job, live: Live) -> Outcome:
        if job.request.get("stall"):  # one step that blocks the job's thread and A's main connection
            with a._lock:
                time.sleep(1.5 * lease)
        try:
            while True:
                live.check()
                time.sleep(0.01)
        finally:
            stopped[job.id] = time.time()

    worker = PgWorker(a, {"loop": run}, lambda: None)
    worker.start()
    stalled = b.add("loop", {"stall": True})
    while _state_and_worker(url, stalled.id) != (RUNNING, a.worker_id):
        time.sleep(0.02)
    time.sleep(1.5 * lease + 0.2)
    # renewed meanwhile on the lease connection: nothing expired, the job is still A's
    assert b.expire() == [] and b.claim() is None and stalled.id not in stopped
    with psycopg.connect(url, autocommit=True) as db:  # the database takes the job back (as when A stalled)
        db.execute("UPDATE jobs SET state = %s, worker = NULL WHERE id = %s", (PENDING, stalled.id))
    taken = time.time()
    assert b.claim().id == stalled.id  # B runs it now
    while stalled.id not in stopped:
        assert time.time() < taken + 10
        time.sleep(0.01)
    assert stopped[stalled.id] - taken < worker.keeper.period + 0.5  # A's next renewal stopped its runner
    while worker.live is not None:
        time.sleep(0.01)
    assert _state_and_worker(url, stalled.id) == (RUNNING, b.worker_id)  # A recorded no outcome
    b.finish(stalled.id, DONE, {"by": "b"}, None)
    # A's renewal stops: its runner stops itself before the database could give the job to another worker
    worker.keeper.stop()
    plain = b.add("loop", {})
    while plain.id not in stopped:
        time.sleep(0.01)
    assert stopped[plain.id] < _lease_end(url, plain.id)
    assert _state_and_worker(url, plain.id) == (RUNNING, a.worker_id)
    time.sleep(max(0.0, _lease_end(url, plain.id) - time.time()) + 0.1)
    assert b.expire() == [] and b.claim().id == plain.id  # retried: A's attempt recorded nothing
    worker.stop()
    rows = {j.id: j for j in b.jobs((DONE, RUNNING))}
    assert (rows[stalled.id].state, rows[stalled.id].result) == (DONE, {"by": "b"})
    with psycopg.connect(url) as db:
        attempts = dict(db.execute("SELECT id, attempts FROM jobs").fetchall())
    assert attempts == {stalled.id: 2, plain.id: 2}
    for store in (a, b):
        store.close()


def test_result_files_are_stored_and_renamed_apart(postgres_url: str, tmp_path: Path) -> None:
    url = fresh_database(postgres_url)
    one, two = PgJobStore(url, 10, folders(tmp_path / "1")), PgJobStore(url, 10, folders(tmp_path / "2"))
    for store, colour in ((one, b"red"), (two, b"blue")):
        (store.folders.outputs / "ComfyUI_00001_.png").write_bytes(colour)
        job = store.add("comfy", {})
        assert store.claim().id == job.id
        ref = {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
        store.finish(job.id, DONE, {"outputs": {"9": {"images": [ref]}}}, None)
    stored = [list(file_refs(j.result))[0]["filename"] for j in one.jobs((DONE,))]
    # the same name from two workers: the second is stored under a name of its own
    assert stored[0] == "ComfyUI_00001_.png" and stored[1].startswith("ComfyUI_00001_-")
    assert [two.read_file("output", "", name) for name in stored] == [b"red", b"blue"]
    one.close()
    two.close()


# ---------------------------------------------------------------------------------------------
# processes: front ends and workers on one queue


def _state_and_worker(queue: str, job_id: str) -> tuple[str, str | None]:
    with psycopg.connect(queue) as db:
        return db.execute("SELECT state, worker FROM jobs WHERE id = %s", (job_id,)).fetchone()


@pytest.fixture(scope="module")
def cluster(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two front ends and three workers on a fresh queue, each with its own input and output folders,
    shared by the tests below (the last one kills some)."""
    root = tmp_path_factory.mktemp("cluster")
    write_models(root)
    queue = fresh_database(postgres_url)
    with processes(root, queue, 2, 3, ("--preview-method", "latent2rgb")) as running:
        yield running


_ADVERTISED = "SELECT models, device FROM workers"


def test_uploaded_inputs_reach_a_worker_elsewhere(cluster: Cluster) -> None:
    from test_server_api import b64png, png, unb64

    client = httpx.Client(base_url=cluster.urls[0], timeout=120)
    workflow = txt2img_workflow(steps=2, prefix="i2i")
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "up/init.png"}}
    workflow["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    workflow["3"]["inputs"] |= {"latent_image": ["11", 0], "denoise": 0.6}
    for size in ((40, 32), (24, 48)):  # the second upload replaces the first: the worker reads the new one
        image = ("init.png", png(Image.new("RGB", size, (20, 160, 60))))
        upload = client.post(
            "/upload/image", files={"image": image}, data={"subfolder": "up", "overwrite": "1"}
        )
        assert upload.status_code == 200, upload.text
        prompt_id = client.post("/prompt", json={"prompt": workflow}).json()["prompt_id"]
        entry = wait_history(client, prompt_id, timeout=120)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (ref,) = entry["outputs"]["9"]["images"]
        assert Image.open(io.BytesIO(client.get("/view", params=ref).content)).size == size
    init, mask = Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("L", (48, 40), 0)
    mask.paste(255, (0, 0, 24, 40))
    body = {"prompt": "a cat", "init_images": [b64png(init)], "mask": b64png(mask), "mask_blur": 0}
    body |= {"denoising_strength": 0.5, "steps": 2, "width": 32, "height": 32, "seed": 5}
    answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    result = unb64(answer.json()["images"][0])
    # "only masked" pastes the inpainted region into the init image: its unmasked right half is unchanged
    assert result.size == (48, 40) and result.crop((24, 0, 48, 40)).getcolors() == [(24 * 40, (200, 30, 30))]
    deadline = time.time() + 10
    with psycopg.connect(cluster.queue, autocommit=True) as db:  # workers advertise the checkpoints loaded
        # (the img2img above loads the default model, on whichever worker took it: maybe the tiny one's)
        while not any(MODEL in models for models, _ in db.execute(_ADVERTISED).fetchall()):
            assert time.time() < deadline, db.execute(_ADVERTISED).fetchall()  # a heartbeat each second
            time.sleep(0.1)
        rows = db.execute(_ADVERTISED).fetchall()
    assert len(rows) == 3 and {device for _, device in rows} == {"cpu"}


def test_a_second_server_on_one_state_folder_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # the first server: a process holding the lock `sdlab serve` takes at start (a whole server is slower)
    hold = "import sys, time; from sdlab.server.cli import lock_state_folder as lock; "
    hold += "print(lock(__import__('pathlib').Path(sys.argv[1])), flush=True); time.sleep(60)"
    first = subprocess.Popen([sys.executable, "-c", hold, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "None\n"  # it took the lock
        args = [sys.executable, "-m", "sdlab.server", "-q", "--state-dir", str(state)]
        second = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"state folder {state}" in second.stderr and "--queue postgresql://" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_progress_and_previews_reach_the_front_end(cluster: Cluster) -> None:
    from websockets.sync.client import connect

    client = httpx.Client(base_url=cluster.urls[1], timeout=120)
    ws_url = cluster.urls[1].replace("http", "ws") + "/ws?clientId="
    with connect(ws_url + "plain", open_timeout=10) as plain:  # announces no preview metadata
        body = {"prompt": txt2img_workflow(steps=10000, size=64, prefix="long"), "client_id": "plain"}
        long_id = client.post("/prompt", json=body).json()["prompt_id"]
        deadline = time.time() + 60
        while (progress := client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2:
            assert time.time() < deadline, progress
            time.sleep(0.2)
        # the worker's progress and preview, stored in the job's row, as the front end's A1111 API shows it
        assert progress["state"]["job"] == long_id and progress["state"]["sampling_steps"] == 10000
        assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (32, 32)
        job_progress = client.get(f"/sdlab/v1/jobs/{long_id}").json()["progress"]
        assert job_progress["total"] == 10000 and job_progress["step"] >= 2
        assert _first_preview(plain)[:8] == struct.pack(">II", 1, 2)  # a plain ComfyUI preview frame
        client.post("/interrupt", json={"prompt_id": long_id})
    with connect(ws_url + "meta", open_timeout=10) as meta:
        meta.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        assert json.loads(meta.recv(timeout=10))["type"] in ("feature_flags", "status")
        body = {"prompt": txt2img_workflow(steps=2, size=160, prefix="big"), "client_id": "meta"}
        big_id = client.post("/prompt", json=body).json()["prompt_id"]
        frame = _first_preview(meta)
        kind, size = struct.unpack(">II", frame[:8])
        assert kind == 4 and json.loads(frame[8 : 8 + size])["prompt_id"] == big_id
        assert Image.open(io.BytesIO(frame[8 + size :])).size == (80, 80)  # the tiny VAE: 1/2
    with psycopg.connect(
        cluster.queue
    ) as db:  # that preview was over NOTIFY's limit: stored, and sent by reference
        assert db.execute("SELECT count(*) FROM previews").fetchone()[0] >= 1


def _first_preview(ws: Any) -> bytes:
    deadline = time.time() + 60
    while time.time() < deadline:
        message = ws.recv(timeout=60)
        if isinstance(message, bytes):
            return message
    raise TimeoutError("no preview on /ws")


def test_a1111_skip_reaches_the_worker_elsewhere(cluster: Cluster) -> None:
    check_skip(httpx.Client(base_url=cluster.urls[1], timeout=120))


def test_a_paused_worker_loses_its_job_to_another_and_records_nothing(cluster: Cluster) -> None:
    """SIGSTOP of the worker running a job: its lease expires and another worker runs the job; once
    resumed, the first stops the job at its next step and records nothing: the job completes once."""
    client = httpx.Client(base_url=cluster.urls[0], timeout=120)
    body = {"prompt": txt2img_workflow(seed=7, steps=40, prefix="paused")}
    job_id = client.post("/prompt", json=body).json()["prompt_id"]
    deadline = time.time() + 60
    while progress_step(cluster.queue, job_id) < 1:  # sampling
        assert time.time() < deadline
        time.sleep(0.02)
    i = cluster.worker_of(job_id)
    paused, paused_id, log = cluster.workers[i], cluster.worker_id(i), cluster.root / f"worker{i}" / "log"
    paused.send_signal(signal.SIGSTOP)
    try:
        while (now := _state_and_worker(cluster.queue, job_id)) in ((RUNNING, paused_id), (PENDING, None)):
            assert time.time() < deadline + LEASE_S
            time.sleep(0.02)
    finally:
        paused.send_signal(signal.SIGCONT)
    resumed = time.time()
    assert now[0] == RUNNING  # taken over by another worker, still running it
    while f"job {job_id}: this worker lost its lease" not in log.read_text():
        assert time.time() < resumed + 30
        time.sleep(0.02)
    stopped_after = time.time() - resumed
    entry = wait_history(client, job_id, timeout=120)
    assert entry["status"]["status_str"] == "success"
    with psycopg.connect(cluster.queue) as db:
        attempts, files = db.execute(
            "SELECT attempts, (SELECT count(*) FROM files WHERE job = id) FROM jobs WHERE id = %s", (job_id,)
        ).fetchone()
    saved = [len(list((cluster.root / f"worker{k}" / "outputs").glob("paused*"))) for k in range(3)]
    assert (attempts, files, sum(saved), saved[i]) == (2, 1, 1, 0)  # the paused worker saved no image
    assert stopped_after < LEASE_S, stopped_after  # it stopped at once on resuming
    assert paused.poll() is None


def test_scale_run_with_kill_9_of_a_worker_and_a_front_end(cluster: Cluster) -> None:
    """The issue's run (last of the cluster's tests: it kills a worker and a front end)."""
    report = scale_run(cluster, jobs=200, clients=16)
    print("\n".join(report.lines()))
    assert (report.answered, report.unanswered, report.kills) == (200, [], 2)
    # every job finished, once: only the job of the killed worker was claimed twice, and it was done
    assert report.unfinished == [] and report.failed == [] and report.duplicates == []
    assert report.attempts == {report.killed_job[:8]: 2}
    assert report.unreadable == 0  # every stored image served by the surviving front end
    # /ws progress reached every ComfyUI client through the front end it used (unless that one was killed)
    assert report.ws_silent == [] and report.ws_progress + report.ws_cut == 100 and report.ws_progress >= 90
