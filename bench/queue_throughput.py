"""No-op jobs through the PostgreSQL queue: jobs/s and claim latency with W worker processes.

    python bench/queue_throughput.py --queue postgresql://USER@HOST:PORT/DB [--jobs 2000] [--workers 4]

Each worker is a process with its own connection and `Worker` thread, as `sdlab worker` runs them; the jobs
are queued first, then drained. Claim latency is the time one `claim()` takes (lease expiry check + the
SKIP LOCKED claim, two transactions) with all workers claiming at once; finish is the time of `finish()`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from sdlab.server.jobs import DONE, Outcome
from sdlab.server.paths import Folders
from sdlab.server.queue_pg import PgJobStore, PgWorker


def folders() -> Folders:
    root = Path(tempfile.mkdtemp(prefix="sdlab-bench-"))
    return Folders(None, root / "outputs", root / "input", root / "state")


def drain(url: str) -> None:
    """Run no-op jobs until the queue holds no pending job."""
    store = PgJobStore(url, 10**9, folders())
    worker = PgWorker(store, {"noop": lambda job, live: Outcome(DONE, {})}, lambda: None)
    claims: list[float] = []
    while True:
        start = time.perf_counter()
        job = store.claim()
        claims.append(time.perf_counter() - start)
        if job is None:
            break
        worker._run(job)
    print(f"  worker: {len(claims) - 1} jobs, claim median {statistics.median(claims) * 1e3:.2f} ms")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", required=True)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    store = PgJobStore(args.queue, 10**9, folders())
    store.forget()
    start = time.perf_counter()
    for _ in range(args.jobs):
        store.add("noop", {})
    added = time.perf_counter() - start
    procs = [multiprocessing.Process(target=drain, args=(args.queue,)) for _ in range(args.workers)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    drained = time.perf_counter() - start
    jobs = store.jobs((DONE,))
    assert len(jobs) == args.jobs, f"{len(jobs)} of {args.jobs} jobs done"
    runs = [j.finished - j.started for j in jobs]
    print(f"queued {args.jobs} jobs in {added:.2f} s: {args.jobs / added:.0f} submissions/s")
    print(f"{args.workers} workers drained them in {drained:.2f} s: {args.jobs / drained:.0f} jobs/s")
    print(f"claimed -> finished (no-op run + finish): median {statistics.median(runs) * 1e3:.2f} ms")
    store.close()


if __name__ == "__main__":
    main()
