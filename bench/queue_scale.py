"""The issue-16 scale run: front ends and workers on one PostgreSQL queue, tiny-model jobs from many clients
through both APIs, one worker and one front end killed with SIGKILL mid-run.

    python bench/queue_scale.py --queue postgresql://USER@HOST:PORT/postgres [--jobs 200] [--clients 16]

Jobs alternate between ComfyUI (/prompt, then /history) and A1111 (/sdapi/v1/txt2img) and between the front
ends. After a fifth of the jobs is submitted, the worker holding a running job is killed; after half, the
first front end (its clients move to the other). At the end every job row must be done, or failed with its
reason; "duplicates" counts jobs with more than one stored image, "lost" the jobs a front end accepted that
are missing or unfinished; every done job's image is read back through the surviving front end.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_queue_pg import _worker_id, fresh_database, processes  # noqa: E402
from test_server_api import MODEL, txt2img_workflow, write_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", required=True, help="a PostgreSQL server URL (a fresh database is made)")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--front-ends", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sdlab-scale-"))
    write_models(root)
    queue = fresh_database(args.queue)
    with processes(root, queue, args.front_ends, args.workers) as (urls, fronts, workers):
        start = time.perf_counter()
        accepted, kills = run_clients(args, root, queue, urls, fronts, workers)
        wall = time.perf_counter() - start
        unreadable = check_images(queue, urls[-1])
    report(queue, accepted, kills, wall, unreadable, args)


def run_clients(
    args: argparse.Namespace, root: Path, queue: str, urls: list[str], fronts: list, workers: list
) -> tuple[list[str], int]:
    """Submit the jobs from `clients` threads, killing a worker and a front end on the way; the ids of the
    ComfyUI jobs and the seeds (as str) of the A1111 jobs that a front end accepted."""
    dead: set[str] = set()
    accepted: list[str] = []
    counter, lock, kills = itertools.count(), threading.Lock(), [0]

    def client_for(i: int) -> httpx.Client:
        live = [u for u in urls if u not in dead]
        return httpx.Client(base_url=live[i % len(live)], timeout=600)

    def job(i: int) -> None:
        n = next(counter)
        if n == args.jobs // 5:
            kill_a_running_worker(root, queue, workers)
            kills[0] += 1
        if n == args.jobs // 2:
            dead.add(urls[0])
            fronts[0].kill()
            kills[0] += 1
        for _ in range(3):  # a request to the killed front end is sent again to a live one
            try:
                keys = submit(i, client_for(i))
                with lock:
                    accepted.extend(keys)
                return
            except httpx.TransportError:
                time.sleep(0.5)

    def submit(i: int, client: httpx.Client) -> list[str]:
        if i % 2:
            body = {"prompt": txt2img_workflow(seed=i, steps=2, prefix=f"c{i}")}
            prompt_id = client.post("/prompt", json=body).json()["prompt_id"]
            with lock:
                accepted.append(prompt_id)
            while not poll(i, prompt_id):  # through a live front end: the first may be killed meanwhile
                time.sleep(0.2)
            return []
        body: dict[str, Any] = {"prompt": "q", "steps": 2, "width": 32, "height": 32, "seed": 10_000 + i}
        body |= {"save_images": True, "override_settings": {"sd_model_checkpoint": MODEL}}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        return [f"seed:{10_000 + i}"] if answer.status_code == 200 else []

    def poll(i: int, prompt_id: str) -> bool:
        try:
            return bool(client_for(i).get(f"/history/{prompt_id}").json())
        except httpx.TransportError:
            return False

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(job, range(args.jobs)))
    return accepted, kills[0]


def kill_a_running_worker(root: Path, queue: str, workers: list) -> None:
    with psycopg.connect(queue) as db:
        while (
            row := db.execute("SELECT worker FROM jobs WHERE state = 'running' LIMIT 1").fetchone()
        ) is None:
            time.sleep(0.05)
    for i, proc in enumerate(workers):
        if _worker_id(root, i) == row[0]:
            proc.kill()


def check_images(queue: str, url: str) -> int:
    """How many done jobs' images the front end at url does not serve."""
    with psycopg.connect(queue) as db:
        refs = db.execute("SELECT type, subfolder, filename FROM files WHERE type <> 'input'").fetchall()
    client = httpx.Client(base_url=url, timeout=60)
    names = ("type", "subfolder", "filename")
    return sum(
        client.get("/view", params=dict(zip(names, ref, strict=True))).status_code != 200 for ref in refs
    )


def report(queue: str, accepted: list[str], kills: int, wall: float, unreadable: int, args: Any) -> None:
    with psycopg.connect(queue) as db:
        rows = db.execute(
            "SELECT id, state, error, attempts, request->'generation'->>'seed', "
            "(SELECT count(*) FROM files f WHERE f.job = j.id AND f.type <> 'input') FROM jobs j"
        ).fetchall()
    keys = {row[0] for row in rows} | {f"seed:{row[4]}" for row in rows if row[4] is not None}
    finished = {row[0] for row in rows if row[1] in ("done", "failed", "cancelled")}
    finished |= {f"seed:{row[4]}" for row in rows if row[4] is not None and row[1] in ("done", "failed")}
    lost = sum(1 for key in accepted if key not in keys or key not in finished)
    duplicates = sum(1 for row in rows if row[5] > 1)
    failed = [(row[0][:8], row[2]) for row in rows if row[1] == "failed"]
    retried = sum(1 for row in rows if row[3] > 1)
    print(f"front ends {args.front_ends}, workers {args.workers}, clients {args.clients}")
    print(f"jobs {len(rows)} (accepted {len(accepted)}), done {sum(r[1] == 'done' for r in rows)}")
    print(f"kills {kills}, retried {retried}, failed {len(failed)} {failed}")
    print(f"duplicates {duplicates}, lost {lost}, images unreadable through the live front end {unreadable}")
    print(f"wall {wall:.1f} s, {len(rows) / wall:.2f} jobs/s")


if __name__ == "__main__":
    main()
