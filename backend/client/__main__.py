"""``python -m backend.client health URL``: the server's health as one JSON line (Blender's Check for the Remote
backend). The token comes from $IMAGE_TO_3D_SERVER_TOKEN, never from a command line."""

import json
import os
import sys

from ..protocol import TOKEN_ENV
from .remote import RemoteError, health


def main(argv: list[str]) -> int:
    """``python -m backend.client health URL`` (the token in $TOKEN_ENV, never on a command line):
    one JSON line, the ``result`` with the report or the ``error``. Blender's Check for the Remote backend."""
    if argv[:1] != ["health"] or len(argv) != 2:
        print("usage: python -m backend.client health URL", file=sys.stderr)
        return 2
    try:
        report = health(argv[1], os.environ.get(TOKEN_ENV) or None)
    except RemoteError as e:
        print(json.dumps({"event": "error", **e.to_dict()}), flush=True)
        return 1
    print(json.dumps({"event": "result", "health": report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
