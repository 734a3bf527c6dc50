"""A stand-in for the model hub on 127.0.0.1 (point HF_ENDPOINT at ``.url``), speaking the hub's API as
``huggingface_hub`` uses it: ``HEAD /<repo>/resolve/<rev>/<path>`` answers with the file's metadata (``X-Repo-Commit``,
``ETag``, and on a redirect ``X-Linked-Etag`` and ``X-Linked-Size``, as the hub does for files on its CDN), ``GET``
with the bytes, or a large file of zeros streamed in chunks; honours Range requests; a redirect may point at a
second instance (another origin: the "CDN"). Errors carry the hub's ``X-Error-Code`` (EntryNotFound, GatedRepo).
Logs each GET as (path, Range, Authorization) in ``requests`` and each HEAD as (path, Authorization) in ``heads``;
can be slowed down, break a response off part-way (to test resuming), stall part-way with the connection held
open, send a body with no Content-Length, redirect, or answer with a forced HTTP status. Counts the bytes it
managed to send per path. Used by the plain and the bpy suites."""

import hashlib
import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 20
COMMIT = "c0ffee" * 6 + "c0de"  # what a branch such as "main" resolves to


class Zeros:
    """``size`` zero bytes, produced on demand (a real-sized model file without holding it in memory)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def chunks(self, start: int, piece: int = CHUNK):
        block = bytes(piece)
        left = self.size - start
        while left > 0:
            n = min(piece, left)
            yield block[:n]
            left -= n


class StandInHub:
    def __init__(self, files: dict):
        self.files = dict(files)  # url path -> bytes or Zeros
        self.requests = []  # GETs: (path, Range header, Authorization header)
        self.heads = []  # HEADs: (path, Authorization header)
        self.error_code = {}  # url path -> X-Error-Code sent with a forced status (GatedRepo...)
        self.break_after = {}  # url path -> byte count: the next response for it stops there
        self.stall_after = {}  # url path -> byte count: the next response for it stops there, connection held open
        self.status = {}  # url path -> forced HTTP status
        self.redirect = {}  # url path -> Location (a full URL, or a path on this origin): answered with 302
        self.no_length = set()  # url paths sent without Content-Length: the body ends when the connection closes
        self.sent = {}  # url path -> body bytes written to the socket, all responses together
        self.delay = 0.0  # seconds per chunk sent
        self.piece = CHUNK  # bytes per chunk sent
        self.closing = threading.Event()  # ends the stalls
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _error(self, status, code=None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _metadata(self, data):
                """The hub's headers for a file: the commit its revision is at, and its ETag (a sha256, as an LFS
                file's; zeros get a made-up one rather than an hour of hashing)."""
                parts = self.path.split("/")
                if len(parts) > 4 and parts[3] == "resolve":
                    revision = parts[4]
                    self.send_header("X-Repo-Commit", revision if len(revision) == 40 else COMMIT)
                if data is not None:
                    etag = f"zeros{len(data)}" if isinstance(data, Zeros) else hashlib.sha256(data).hexdigest()
                    self.send_header("ETag", f'"{etag}"')
                    return etag

            def do_HEAD(self):
                hub.heads.append((self.path, self.headers.get("Authorization")))
                if self.path in hub.status:
                    self._error(hub.status[self.path], hub.error_code.get(self.path))
                    return
                data = hub.files.get(self.path)
                if self.path in hub.redirect:
                    self.send_response(302)
                    self.send_header("Location", hub.redirect[self.path])
                    etag = self._metadata(data)
                    if data is not None:  # the file's own metadata on the redirect, as the hub's for its CDN
                        self.send_header("X-Linked-Etag", f'"{etag}"')
                        self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if data is None:
                    self._error(404, "EntryNotFound")
                    return
                self.send_response(200)
                self._metadata(data)
                if self.path not in hub.no_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if self.path in hub.status:
                    self._error(hub.status[self.path], hub.error_code.get(self.path))
                    return
                if self.path in hub.redirect:
                    self.send_response(302)
                    self.send_header("Location", hub.redirect[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files.get(self.path)
                if data is None:
                    self._error(404, "EntryNotFound")
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self._error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self._metadata(data)
                if self.path not in hub.no_length:
                    self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                if isinstance(data, Zeros):
                    chunks = data.chunks(start, hub.piece)
                else:
                    chunks = (data[i:i + hub.piece] for i in range(start, len(data), hub.piece))
                cut = hub.break_after.pop(self.path, None)
                stall = hub.stall_after.pop(self.path, None)
                sent = 0
                try:
                    for chunk in chunks:
                        if stall is not None and sent + len(chunk) >= stall:
                            self.wfile.write(chunk[:stall - sent])
                            self.wfile.flush()
                            hub.sent[self.path] = hub.sent.get(self.path, 0) + stall - sent
                            hub.closing.wait()
                            return
                        if cut is not None and sent + len(chunk) >= cut:
                            self.wfile.write(chunk[:cut - sent])
                            self.wfile.flush()
                            hub.sent[self.path] = hub.sent.get(self.path, 0) + cut - sent
                            with contextlib.suppress(OSError):
                                self.connection.shutdown(2)
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        hub.sent[self.path] = hub.sent.get(self.path, 0) + len(chunk)
                        if hub.delay:
                            time.sleep(hub.delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
