import sys
from pathlib import Path

# The repository root is the extension root: `backend` is importable from there, as in the worker.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os  # noqa: E402
import tempfile  # noqa: E402

# Workers and pipelines started by the tests keep generation fields here, not in the user's cache.
os.environ.setdefault("IMAGE_TO_3D_FIELDS", tempfile.mkdtemp(prefix="image_to_3d-fields-"))
