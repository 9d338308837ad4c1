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
