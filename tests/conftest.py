import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (reference.py) import as top-level modules

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_size_files(tmp_path_factory: pytest.TempPathFactory):
    """`get(family) -> (checkpoint, diffusers config folder)`, written once per session per family."""
    from reference import write_real_size_files

    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            cache[family] = write_real_size_files(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get
