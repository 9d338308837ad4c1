import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (reference.py) import as top-level modules

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name but loopback resolves
]


@pytest.fixture(scope="session")
def real_size_files(tmp_path_factory: pytest.TempPathFactory):
    """`get(family) -> (checkpoint, diffusers config folder)`, written once per session per family."""
    from reference import write_real_size_files

    cache: dict[str, tuple[Path, Path]] = {}
    need = 8 << 30  # one fp16 checkpoint (2-3 GB) plus the two copies a round-trip test writes

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            free = shutil.disk_usage(folder).free
            if free < need:
                gib = f"need {need >> 30} GiB free in {folder}, {free >> 30} GiB left"
                pytest.skip(f"real-size {family} files {gib}")
            cache[family] = write_real_size_files(family, folder)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's headless Chromium through playwright (no browser download); skips when either is absent."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        playwright = sync_playwright().start()
    except Exception as e:  # the package's bundled driver cannot run here
        pytest.skip(f"the playwright driver does not start: {e}")
    context = playwright.chromium.launch_persistent_context(
        tmp_path_factory.mktemp("chromium-profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 800},
        service_workers="block",
    )
    yield context
    context.close()
    playwright.stop()


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (/usr/lib/postgresql/N/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server (initdb + pg_ctl in a temp folder, a free loopback port) for the
    session, as a `postgresql://` URL; run as the `postgres` user when the tests run as root (the server
    refuses root). Skips only when no server binaries are installed or the server cannot start."""
    import os
    import subprocess
    import tempfile

    from test_server_api import free_port

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql; .ci/run installs it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'sdlab[queue]')")
    # not under pytest's temp root: it is private to the user running the tests, and the server may not be
    folder = Path(tempfile.mkdtemp(prefix="sdlab-postgres-"))
    data, port = folder / "data", free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60)

    init = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "sdlab", "-A", "trust", "-E", "UTF8")
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr.strip()[-500:]}")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=200"
    pg_ctl = (str(bin_dir / "pg_ctl"), "-D", str(data))
    start = run(*pg_ctl, "-l", str(folder / "log"), "-o", options, "-w", "start")
    if start.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-500:]}")
    try:
        yield f"postgresql://sdlab@127.0.0.1:{port}/postgres"
    finally:
        run(*pg_ctl, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
