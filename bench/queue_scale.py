"""The issue-16 scale run: front ends and workers on one PostgreSQL queue, tiny-model jobs from many clients
through both APIs, one worker (mid-job) and one front end killed with SIGKILL on the way.

    python bench/queue_scale.py --queue postgresql://USER@HOST:PORT/postgres [--jobs 200] [--clients 16]

The run itself is tests/queue_cluster.py's `scale_run` (tests/test_queue_pg.py runs it in the default suite):
"lost" counts the requests never answered and the jobs left unfinished, "duplicates" the done jobs without
exactly one stored image, "retried" the jobs claimed more than once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from queue_cluster import fresh_database, processes, scale_run  # noqa: E402
from test_server_api import write_models  # noqa: E402


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
    with processes(root, fresh_database(args.queue), args.front_ends, args.workers) as cluster:
        report = scale_run(cluster, args.jobs, args.clients)
    print(f"front ends {args.front_ends}, workers {args.workers}, clients {args.clients}")
    print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
