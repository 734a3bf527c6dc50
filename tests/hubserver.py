"""A stand-in for the model hub on 127.0.0.1 (point HF_ENDPOINT at ``.url``): serves bytes, or a large file
of zeros streamed in chunks, at /<repo>/resolve/<rev>/<path>; honours Range requests; logs each request as
(path, Range, Authorization); can be slowed down, break a response off part-way (to test resuming) or answer
with a forced HTTP status. Used by the plain and the bpy suites."""

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 20


class Zeros:
    """``size`` zero bytes, produced on demand (a real-sized model file without holding it in memory)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def chunks(self, start: int):
        block = bytes(CHUNK)
        left = self.size - start
        while left > 0:
            n = min(CHUNK, left)
            yield block[:n]
            left -= n


class StandInHub:
    def __init__(self, files: dict):
        self.files = dict(files)  # url path -> bytes or Zeros
        self.requests = []  # (path, Range header, Authorization header)
        self.break_after = {}  # url path -> byte count: the next response for it stops there
        self.status = {}  # url path -> forced HTTP status
        self.delay = 0.0  # seconds per chunk sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if self.path in hub.status:
                    self.send_error(hub.status[self.path])
                    return
                data = hub.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunks = data.chunks(start) if isinstance(data, Zeros) else [data[start:]]
                cut = hub.break_after.pop(self.path, None)
                sent = 0
                try:
                    for chunk in chunks:
                        if cut is not None and sent + len(chunk) >= cut:
                            self.wfile.write(chunk[:cut - sent])
                            self.wfile.flush()
                            with contextlib.suppress(OSError):
                                self.connection.shutdown(2)
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
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
        self.server.shutdown()
        self.server.server_close()
