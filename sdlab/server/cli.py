"""`sdlab serve`: the HTTP server (AUTOMATIC1111 and ComfyUI APIs) on uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sdlab.devices import Placement, add_device_arguments
from sdlab.images import add_image_limit_arguments

API_KEY_ENV = "SDLAB_API_KEY"
DEFAULT_MODELS = Path("models")


def is_loopback(host: str) -> bool:
    """Whether host only listens on this machine (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name in a `Host` header value, lower case, without port, IPv6 brackets or trailing dot.

    A malformed value (junk after `]`, a port that is not digits) comes back whole, so it matches no name.
    """
    value = host.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and port[1:].isdigit() or port == ":")):
            return value
    elif value.count(":") == 1:  # name:port; more colons are a bare IPv6 address
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return value
    else:
        name = value
    return name.rstrip(".")


def bind_problem(host: str, api_key: str | None) -> str | None:
    """Why the server must not start on host with this key, or None."""
    if is_loopback(host) or api_key:
        return None
    return (
        f"refusing to listen on {host} without an API key: anyone who can reach it could use the server; "
        f"pass --api-key KEY (or set {API_KEY_ENV}), or bind to 127.0.0.1"
    )


def host_names(value: str) -> tuple[str, ...]:
    """`--allowed-hosts`: comma-separated host names (a port, if given, is ignored)."""
    names = tuple(host_name(v) for v in value.split(",") if v.strip())
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {value!r}")
    return names


def frontend_problem(ui: str, front_end_root: Path | None) -> str | None:
    """Why ComfyUI's frontend cannot be served as asked (`--ui comfy`, `--front-end-root`), or None."""
    from sdlab.server.comfy_frontend import frontend_problem as build_problem
    from sdlab.server.comfy_frontend import installed_frontend

    if front_end_root is not None:
        return build_problem(front_end_root)
    if ui == "comfy" and installed_frontend() is None:
        return "--ui comfy needs ComfyUI's frontend: pip install 'sdlab[serve]' (comfyui-frontend-package)"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the bind address, then serve until interrupted."""
    problem = bind_problem(args.host, args.api_key)
    problem = problem or (None if args.queue else lock_state_folder(args.state_dir))
    if problem is not None:
        print(f"sdlab serve: error: {problem}", file=sys.stderr)
        return 2
    import torch
    import uvicorn

    from sdlab.images import ImageLimits
    from sdlab.server.app import create_app
    from sdlab.server.paths import Folders
    from sdlab.server.state import Settings

    models = args.models_dir or (DEFAULT_MODELS if DEFAULT_MODELS.is_dir() else None)
    if models is not None and not models.is_dir():
        print(f"sdlab serve: error: {models}: no such folder", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = frontend_problem(args.ui, args.front_end_root) or queue_problem(args.queue, args.workers)
    if problem is not None:
        print(f"sdlab serve: error: {problem}", file=sys.stderr)
        return 2
    from sdlab.server.library import ModelPathsError

    folders = Folders(models, args.outputs_dir, args.input_dir, args.state_dir)
    try:
        extra = model_paths(models, args.extra_model_paths)
    except ModelPathsError as e:
        print(f"sdlab serve: error: --extra-model-paths: {e}", file=sys.stderr)
        return 2
    settings = Settings(
        folders,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        allowed_hosts=args.allowed_hosts,
        preview_method=args.preview_method,
        ui=args.ui,
        front_end_root=args.front_end_root,
        image_limits=ImageLimits(args.max_image_pixels, args.max_image_bytes),
        queue=args.queue,
        workers=args.workers,
        lease_s=args.lease,
        extra_model_paths=extra,
        placement=Placement.from_args(args),
    )
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def model_paths(models: Path | None, given: Path | None) -> tuple[tuple[str, Path], ...]:
    """The (kind, folder) pairs of the extra_model_paths.yaml in the models folder, then of `given`."""
    from sdlab.server.library import EXTRA_MODEL_PATHS, extra_model_paths

    files = [] if models is None else [models / EXTRA_MODEL_PATHS]
    files = [f for f in files if f.is_file()] + ([] if given is None else [given])
    return tuple(pair for f in files for pair in extra_model_paths(f))


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `sdlab` command line."""
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP server: AUTOMATIC1111 API (/sdapi/v1), ComfyUI API (/prompt, /ws), web page",
        description="Serve the AUTOMATIC1111 and ComfyUI APIs over one job queue. Binds to 127.0.0.1; "
        "any other address needs an API key (HTTP bearer, or basic auth with the key as password). "
        "Without a key, only requests for a loopback Host (or one in --allowed-hosts) are served.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    add_folder_arguments(p)
    add_device_arguments(p)
    add_queue_arguments(p)
    p.add_argument(
        "--workers",
        type=int,
        choices=(0, 1),
        default=1,
        help="1 (default): run jobs in this process; 0: only queue them for `sdlab worker` processes "
        "(needs --queue)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this key on every request (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--allowed-hosts",
        type=host_names,
        default=(),
        metavar="NAME[,NAME...]",
        help="host names served without an API key besides localhost, 127.0.0.0/8 and [::1] (the Host "
        "header is checked against DNS rebinding; with an API key any name is served)",
    )
    p.add_argument("--max-queue", type=int, default=100, help="pending jobs before HTTP 429 (default: 100)")
    p.add_argument(
        "--ui",
        choices=("sdlab", "comfy"),
        default="sdlab",
        help="the page at / : sdlab's web UI (default; ComfyUI's frontend is at /comfy/), or ComfyUI's "
        "frontend (sdlab's UI is then at /sdlab/)",
    )
    p.add_argument(
        "--front-end-root",
        type=Path,
        metavar="DIR",
        help="serve this ComfyUI frontend build instead of the installed comfyui-frontend-package",
    )
    p.add_argument(
        "--preview-method",
        choices=("none", "auto", "latent2rgb"),
        default="none",
        help="live previews of ComfyUI workflows over /ws: none (default, as ComfyUI), or latent2rgb "
        "(auto is the same: sdlab has no TAESD)",
    )
    add_image_limit_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    p.set_defaults(func=cmd_serve)
    add_worker_parser(subparsers)
    return p


def add_folder_arguments(p: argparse.ArgumentParser) -> None:
    """The folders a server or worker reads and writes."""
    p.add_argument(
        "--models-dir",
        type=Path,
        help="checkpoints, with Stable-diffusion/, VAE/, Lora/ and embeddings/ inside (default: ./models if "
        "it exists); the shipped model is always listed",
    )
    p.add_argument(
        "--extra-model-paths",
        type=Path,
        metavar="FILE",
        help="ComfyUI's extra_model_paths.yaml: more model folders by kind (its a111 and comfyui sections); "
        "one in the models folder is read too",
    )
    p.add_argument(
        "--outputs-dir", type=Path, default=Path("outputs"), help="saved images (default: ./outputs)"
    )
    p.add_argument("--input-dir", type=Path, default=Path("input"), help="uploaded images (default: ./input)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".sdlab-server"),
        help="the job queue database and temp images (default: ./.sdlab-server)",
    )


def add_queue_arguments(p: argparse.ArgumentParser) -> None:
    """Where the job queue lives: SQLite in the state folder, or a PostgreSQL server many processes share."""
    p.add_argument(
        "--queue",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB: one queue for many front ends and workers (needs "
        "'sdlab[queue]'); default: SQLite in --state-dir, one process",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on --queue: a worker that does not renew its hold on a job this long has died; its job is "
        "retried once by another worker, then failed (default: 30)",
    )


def lock_state_folder(folder: Path) -> str | None:
    """Take this process's exclusive lock on the state folder (the embedded SQLite queue is one process's;
    a second server on it would take the first's jobs for crashed ones), held until exit; or why not."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (
            f"another sdlab server is running on the state folder {folder}: the embedded queue is one "
            "process's; give each server its own --state-dir, or share one queue with --queue postgresql://..."
        )
    return None  # the descriptor stays open: the lock lasts until the process exits


def queue_problem(queue: str | None, workers: int) -> str | None:
    """Why `--queue`/`--workers` cannot work as given, or None."""
    if queue is not None and not queue.startswith(("postgresql://", "postgres://")):
        return f"--queue {queue!r}: expected a postgresql:// URL"
    if queue is not None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "--queue needs psycopg: pip install 'sdlab[queue]'"
    if workers == 0 and queue is None:
        return "--workers 0 needs --queue postgresql://...: with the embedded queue nothing else runs jobs"
    return None


def cmd_worker(args: argparse.Namespace) -> int:
    """Run jobs from the shared queue until interrupted (SIGINT or SIGTERM)."""
    import signal
    import threading

    problem = queue_problem(args.queue, 1) or (None if args.queue else "--queue postgresql://... is required")
    if problem is not None:
        print(f"sdlab worker: error: {problem}", file=sys.stderr)
        return 2
    import torch

    from sdlab.devices import resolve_device
    from sdlab.images import ImageLimits
    from sdlab.server.app import RUNNERS
    from sdlab.server.paths import Folders
    from sdlab.server.state import Server, Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    folders = Folders(args.models_dir, args.outputs_dir, args.input_dir, args.state_dir)
    limits = ImageLimits(args.max_image_pixels, args.max_image_bytes)
    placement = Placement.from_args(args)
    try:
        placement.validate()
    except ValueError as e:
        print(f"sdlab worker: error: {e}", file=sys.stderr)
        return 2
    settings = Settings(
        folders, queue=args.queue, lease_s=args.lease, image_limits=limits, placement=placement
    )
    server = Server.open(settings, RUNNERS)
    server.store.device = str(resolve_device(placement.device))
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    print(f"sdlab worker: worker id {server.store.worker_id} on the queue", flush=True)
    stopping.wait()
    server.stop()
    return 0


def add_worker_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `worker` on the `sdlab` command line."""
    p = subparsers.add_parser(
        "worker",
        help="run jobs from a PostgreSQL queue that `sdlab serve --queue URL` front ends fill",
        description="Run the jobs of a shared PostgreSQL queue, one at a time (run one worker per GPU, on "
        "any machine that reaches the database). Result images are stored in the database, so every front "
        "end serves them.",
    )
    add_folder_arguments(p)
    add_device_arguments(p)
    add_queue_arguments(p)
    add_image_limit_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_worker)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sdlab.server`: the same as `sdlab serve`."""
    from sdlab.cli import OneLineParser

    parser = OneLineParser(prog="sdlab")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_serve(parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])]))
