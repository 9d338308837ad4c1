import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (reference.py) import as top-level modules

import pytest  # noqa: E402


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
