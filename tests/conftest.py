import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (reference.py) import as top-level modules
