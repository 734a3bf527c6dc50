"""A scripted exchange with the backend through either transport, recorded as the client sees it.

The same script drives a local worker (pipes) or a shared server (HTTP): a generate, a bake on its field, a
cancelled generate, and two refused requests. What went over the wire (the requests) and what came back (the
events, the result files) is reduced to what must not change when the code is moved around: time-dependent
parts (job ids, temporary paths, seconds, the number of progress events within a stage) are normalised.

``tests/data/wire_exchange_<transport>.json`` holds the exchange recorded before the layout change; the tests
replay it against today's code. ``IMAGE_TO_3D_RECORD_WIRE=1`` writes the files anew instead of comparing.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
TINY = DATA / "triposr_tiny"
IMAGE = TINY / "input_rgba.png"
FAST = {"weights": str(TINY), "resolution": 64, "remove_background": False, "device": "cpu"}
SLOW = dict(FAST, resolution=512)
VOLATILE_STATS = ("seconds", "total_seconds", "model_cache", "field_id")
RECORDING = os.environ.get("IMAGE_TO_3D_RECORD_WIRE") == "1"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_record(path: str | None) -> dict | None:
    if not path:
        return None
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as data:
            return {"name": p.name, "arrays": {k: [str(data[k].dtype), list(data[k].shape),
                                                   digest(np.ascontiguousarray(data[k]).tobytes())]
                                               for k in sorted(data.files)}}
    return {"name": p.name, "sha256": digest(p.read_bytes())}


class Scrubber:
    """Replaces what differs from run to run by placeholders."""

    def __init__(self, *folders):
        self.folders = [(str(f), "<tmp>") for f in folders if f] + [(str(ROOT), "<root>")]

    def text(self, value):
        if isinstance(value, str):
            for folder, name in self.folders:
                value = value.replace(folder, name)
            return value
        if isinstance(value, dict):
            return {k: self.text(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.text(v) for v in value]
        return value

    def event(self, event: dict) -> dict | None:
        kind = event.get("event")
        if kind == "log":
            return None
        if kind == "ready":
            return {"event": "ready", "keys": sorted(event)}
        if kind == "progress":
            return {"event": "progress", "stage": event.get("stage")}
        out = dict(event)
        if out.get("id") is not None:
            out["id"] = "<job>"
        if kind == "result":
            out["path"] = Path(out["path"]).name if out.get("path") else None
            out["views"] = Path(out["views"]).name if out.get("views") else None
            out["stats"] = {k: v for k, v in (out.get("stats") or {}).items() if k not in VOLATILE_STATS}
        return self.text(out)

    def events(self, events: list) -> list:
        kept = []
        for event in filter(None, map(self.event, events)):
            if event["event"] == "progress" and kept and kept[-1] == event:
                continue  # the number of progress events within a stage depends on the clock
            kept.append(event)
        return kept


class RequestLog:
    """The requests as sent: the pipe's JSON lines, or the HTTP requests (method, path, headers, body)."""

    def __init__(self):
        self.requests: list = []

    def pipe(self, worker) -> None:
        worker.start()
        stdin = worker.process.stdin
        write = stdin.write

        def recording_write(text):
            for line in text.splitlines():
                if line.strip():
                    self.requests.append(json.loads(line))
            return write(text)

        stdin.write = recording_write

    def http(self, monkeypatch) -> None:
        original = http.client.HTTPConnection.request
        log = self.requests

        def request(connection, method, url, body=None, headers=None, **kwargs):
            sent = {"method": method, "path": url,
                    "headers": sorted(k for k in (headers or {}))}
            if body:
                payload = json.loads(body)
                for key in ("image", "mesh"):
                    if key in payload:
                        payload[key] = f"<{len(base64.b64decode(payload[key]))} bytes>"
                sent["body"] = payload
            log.append(sent)
            return original(connection, method, url, body=body, headers=headers, **kwargs)

        monkeypatch.setattr(http.client.HTTPConnection, "request", request)


def _collect(client, timeout=300) -> list:
    events, deadline = [], time.monotonic() + timeout
    while not client.job.finished:
        events += client.poll()
        assert time.monotonic() < deadline, client.job
        time.sleep(0.01)
    return events + client.poll()


def run(client, tmp_path: Path) -> list:
    """The script; returns one record per step."""
    steps = []

    def step(name, job, events, *files):
        steps.append({"step": name, "state": job.state, "error": job.error, "events": events,
                      "files": [file_record(f) for f in files], "job_dir_kept": job.job_dir.exists()})

    job = client.submit(str(IMAGE), FAST)
    events = _collect(client)
    step("generate", job, events, job.result_path)
    field_id = job.stats["field_id"]

    with np.load(job.result_path) as data:
        faces, vertices = data["faces"], data["vertices"]
    mesh = tmp_path / "polygons.npz"
    np.savez(mesh, vertices=vertices, corner_verts=faces.reshape(-1).astype(np.int32),
             loop_totals=np.full(len(faces), 3, np.int32))
    bake = client.submit(str(IMAGE), {"field_id": field_id, "texture": 512}, op="bake", mesh=str(mesh))
    step("bake", bake, _collect(client), bake.result_path)

    slow = client.submit(str(IMAGE), SLOW)
    seen, deadline = [], time.monotonic() + 180
    while slow.stage != "extracting_surface" and not slow.finished:
        seen += client.poll()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.cancel()
    _collect(client, 60)
    steps.append({"step": "cancel", "state": slow.state, "error": slow.error, "job_dir_kept": slow.job_dir.exists()})

    bad = client.submit(str(IMAGE), dict(FAST, resolution=5))
    step("bad_option", bad, _collect(client))

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 10)
    broken = client.submit(str(corrupt), FAST)
    step("corrupt_image", broken, _collect(client))
    return steps


def check(transport: str, client, tmp_path: Path, requests: RequestLog) -> None:
    """Replay the script; compare with (or, when recording, write) the recorded exchange."""
    steps = run(client, tmp_path)
    scrub = Scrubber(tmp_path, client.temp_dir)
    for s in steps:
        if "events" in s:
            s["events"] = scrub.events(s["events"])
        s["error"] = scrub.text(s["error"])
    record = {"requests": scrub.text([_request(r) for r in requests.requests]), "steps": steps}
    path = DATA / f"wire_exchange_{transport}.json"
    if RECORDING:
        path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    expected = json.loads(path.read_text())
    assert json.loads(json.dumps(record, sort_keys=True)) == expected


def _request(request: dict) -> dict:
    request = dict(request)
    if request.get("id"):
        request["id"] = "<job>"
    if request.get("output_dir"):
        request["output_dir"] = "<job_dir>"
    options = request.get("options") or (request.get("body") or {}).get("options")
    if options and options.get("field_id"):
        options["field_id"] = "<field>"
    return request
