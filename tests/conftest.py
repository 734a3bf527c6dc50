import sys
from pathlib import Path

# The repository root is the extension root: `backend` is importable from there, as in the worker.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
