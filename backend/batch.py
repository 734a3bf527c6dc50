"""Many images through the one pipeline: ``python -m backend generate A.png refs/ 'shots/*.png' -o OUT/``.

The model is loaded once and kept; every image then goes through :func:`reconstruct` (``pipeline.generate``,
as a single-image run does) and :func:`save_mesh`. The Ray batch (``ray_batch.py``) calls the same two
functions, so a cluster writes the same names and the same files.

- Inputs: image files (taken as given), folders (the images directly inside, by name) and glob patterns
  (``**`` recurses), in the order given; a file named twice is done once.
- Outputs: ``OUT/<stem>.<ext>``; a stem seen before (case-insensitively: Windows and macOS file systems
  do not tell ``A`` from ``a``) becomes ``<stem>-2``, ``<stem>-3``... in input order, so the same command
  always gives the same names (which ``--skip-existing`` relies on to resume).
- A bad image is reported and skipped; the others go on. Ctrl+C finishes the image in hand and stops; a
  second Ctrl+C stops at once. Either way only complete files are left (``mesh.save`` writes under a
  temporary name, then renames).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import errors
from .errors import BackendError, InputError

SOME_FAILED = 5  # exit status of a batch in which at least one image failed (the others were written)
INTERRUPTED = 130
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
FORMATS = ("glb", "obj", "ply", "npz")


@dataclass
class Item:
    """One input of the batch. ``problem``: why an argument gave no image (reported, never run)."""

    number: int  # 1-based, in input order
    input: Path
    output: Optional[Path] = None
    problem: Optional[BackendError] = None

    @property
    def name(self) -> str:
        return str(self.input)


def has_wildcards(text: str) -> bool:
    return any(c in text for c in "*?[")


def _images_in(paths) -> list:
    return sorted(p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def expand_inputs(arguments) -> list:
    """[(path, problem or None)] for the arguments: files as given, then folders and patterns expanded."""
    import glob

    found, seen = [], set()
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            matches = _images_in(path.iterdir())
            empty = f"no images in folder {argument} (looked for {', '.join(IMAGE_SUFFIXES)})"
        elif not path.exists() and has_wildcards(argument):
            matches = _images_in(Path(p) for p in glob.glob(argument, recursive=True))
            empty = f"no images match {argument!r}"
        else:
            matches, empty = [path], None  # a missing file is reported by the pipeline, as in a single run
        if not matches:
            found.append((path, InputError(empty, hint="Check the folder or the pattern (quote it: 'shots/*.png').")))
        for match in matches:
            key = os.path.normcase(os.path.abspath(match))
            if key not in seen:
                seen.add(key)
                found.append((match, None))
    return found


def output_names(inputs, folder: Path, suffix: str) -> list:
    """``folder/<stem><suffix>`` for each input, a repeated stem getting ``-2``, ``-3``... in input order."""
    taken, outputs = set(), []
    for path in inputs:
        stem = path.stem or path.name
        name, n = stem, 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.casefold())
        outputs.append(folder / f"{name}{suffix}")
    return outputs


def plan(arguments, folder: Path, fmt: str) -> list:
    """The batch's items, numbered in input order, each with its output file (or the problem it has)."""
    expanded = expand_inputs(arguments)
    if not any(problem is None for _, problem in expanded):
        raise InputError("no images to reconstruct: " + "; ".join(p.message for _, p in expanded))
    images = [path for path, problem in expanded if problem is None]
    outputs = iter(output_names(images, folder, f".{fmt}"))
    return [Item(number, path, None if problem else next(outputs), problem)
            for number, (path, problem) in enumerate(expanded, 1)]


# ------------------------------------------------------------------------------- the per-image work

def check_options(options, here: bool = True) -> None:
    """What makes every image fail, checked once before any: the options, the model's own rules, and (``here``:
    the images run in this process) the device."""
    from . import devices
    from .models import registry
    from .options import check

    check(options, registry.get(options.model))
    if here:
        devices.resolve(options.device)


def load_model(options, model_cache: dict):
    """Load the model into ``model_cache`` as :func:`reconstruct` will look it up (so every image finds it
    there). Returns the device. Raises the setup errors: options, licence, weights."""
    from . import devices, licences
    from .models import registry

    check_options(options)
    spec = registry.get(options.model)
    licences.ensure_accepted(spec.licence, spec.id, spec.display_name, accept_now=options.accept_licence)
    device = devices.resolve(options.device)
    registry.load(spec, options.weights, device, cache=model_cache)
    return device


def reconstruct(image: Path, options, model_cache: dict, progress=None, cancelled=None):
    """One image -> a :class:`~.mesh.Mesh`, exactly as a single-image run makes it."""
    from .pipeline import generate

    return generate(image, options, progress=progress, cancelled=cancelled, model_cache=model_cache)


def save_mesh(mesh, output: Path, inputs=()) -> dict:
    """Write the mesh (atomically) unless that would overwrite one of ``inputs``; returns the summary fields
    of the single-run ``--json`` line: output, vertex and face counts, the pipeline's stats."""
    from . import mesh as meshio

    protected = {Path(p).resolve() for p in inputs}
    for path in meshio.output_files(mesh, output):
        if path.resolve() in protected:
            raise InputError(f"writing {output} would overwrite the input image {path}")
    meshio.save(mesh, output)
    return {"output": str(output), "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            **mesh.stats}


def error_fields(exc: BaseException) -> dict:
    """A failure as the worker's ``error`` event has it (code, message, hint); a bug's traceback goes to stderr."""
    if not isinstance(exc, BackendError):
        traceback.print_exception(exc, file=sys.stderr)
    return errors.error_fields(exc)


# ------------------------------------------------------------------------------- reporting

class Report:
    """Progress on stderr ("image 3/12: chair.png · encoding"), JSON lines on stdout, the tally, the exit status.

    JSON lines (``--json``), the worker's event names: ``result`` (input, output, counts, the pipeline's stats,
    total_seconds), ``skipped``, ``error`` (input, code, message, hint), then one ``summary``."""

    def __init__(self, total: int, as_json: bool = False, quiet: bool = False, stream=None):
        self.total, self.as_json, self.quiet = total, as_json, quiet
        self.stream = stream or sys.stdout  # kept: while the batch runs, stray prints go to stderr (see cli)
        self.done = self.failed = self.skipped = 0
        self.interrupted = False
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    def line(self, **fields) -> None:
        if self.as_json:
            print(json.dumps(fields, default=str), file=self.stream, flush=True)

    def say(self, text: str) -> None:
        if not (self.quiet or self.as_json):
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """What is worth a line even with --json (a cluster's workers coming and going): on stderr unless quiet."""
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def prefix(self, item: Item) -> str:
        return f"image {item.number}/{self.total}: {item.name}"

    def progress_for(self, item: Item):
        """A pipeline progress callback: a line per stage, then one per tenth of it."""
        last = {"stage": None, "tenth": 0}

        def show(stage: str, fraction: float, message: str) -> None:
            tenth = int(fraction * 10)
            if stage != last["stage"]:
                self.say(f"{self.prefix(item)} · {stage}")
            elif tenth > last["tenth"]:
                self.say(f"{self.prefix(item)} · {stage} {tenth * 10}%")
            else:
                return
            last.update(stage=stage, tenth=tenth)

        return show

    def result(self, item: Item, fields: dict, seconds: float, **extra) -> None:
        with self._lock:
            self.done += 1
        self.say(f"{self.prefix(item)} · done in {seconds:.1f} s: {fields['output']} "
                 f"({fields['vertices']} vertices, {fields['faces']} faces)")
        for note in fields.get("notes", ()):
            self.say(f"{self.prefix(item)} · note: {note}")
        self.line(event="result", input=item.name, **fields, total_seconds=round(seconds, 3), **extra)

    def error(self, item: Item, error: dict, **extra) -> None:
        with self._lock:
            self.failed += 1
        if not self.quiet:  # an error is not progress: shown even with --json
            print(f"{self.prefix(item)} · failed: {error['message']}", file=sys.stderr, flush=True)
            if error.get("hint"):
                print(f"hint: {error['hint']}", file=sys.stderr, flush=True)
        self.line(event="error", input=item.name, output=item.output and str(item.output), **error, **extra)

    def skip(self, item: Item) -> None:
        with self._lock:
            self.skipped += 1
        self.say(f"{self.prefix(item)} · skipped: {item.output} exists")
        self.line(event="skipped", input=item.name, output=str(item.output))

    def exit_status(self) -> int:
        return INTERRUPTED if self.interrupted else SOME_FAILED if self.failed else 0

    def summary(self, exit_status: Optional[int] = None, started: bool = True) -> int:
        """The summary line (JSON) and, for a batch that ran (``started``), the tally on stderr."""
        status = self.exit_status() if exit_status is None else exit_status
        seconds = time.perf_counter() - self.started
        not_run = self.total - self.done - self.failed - self.skipped
        rate = round(self.done / seconds * 60, 2) if seconds > 0 else 0.0
        self.line(event="summary", images=self.total, done=self.done, failed=self.failed, skipped=self.skipped,
                   not_run=not_run, interrupted=self.interrupted, total_seconds=round(seconds, 3),
                   images_per_minute=rate, exit_status=status)
        if started and not self.quiet:
            text = f"batch: {self.done} done, {self.failed} failed, {self.skipped} skipped"
            text += f", {not_run} not run" if not_run else ""
            print(f"{text} in {seconds:.1f} s ({rate:g} images/min)", file=sys.stderr, flush=True)
            if self.interrupted and not_run:
                print("hint: run the same command with --skip-existing to do the rest", file=sys.stderr, flush=True)
        return status


class StopAfterCurrent:
    """Ctrl+C once: finish the image in hand, then stop (``requested``); a second Ctrl+C stops at once
    (KeyboardInterrupt, as usual). Only the main thread can own signals; elsewhere this does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _on_interrupt(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("stopping after the current image (Ctrl+C again stops at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------- the local batch

def runs(item: Item, skip_existing: bool) -> bool:
    return item.problem is None and not (skip_existing and item.output.exists())


def report_not_run(item: Item, report: Report) -> None:
    """An argument that gave no image is an error; an output already there (--skip-existing) a skip."""
    if item.problem is not None:
        report.error(item, item.problem.to_dict())
    else:
        report.skip(item)


def run_local(items, options, report: Report, stop: StopAfterCurrent, skip_existing: bool = False) -> int:
    """The batch in this process, in input order. A setup error (options, licence, weights) raises before any
    image runs."""
    model_cache: dict = {}
    if any(runs(item, skip_existing) for item in items):
        load_model(options, model_cache)
    inputs = [item.input for item in items]
    for item in items:
        if stop.requested:
            break
        if not runs(item, skip_existing):
            report_not_run(item, report)
            continue
        started = time.perf_counter()
        try:
            mesh = reconstruct(item.input, options, model_cache, progress=report.progress_for(item))
            fields = save_mesh(mesh, item.output, inputs)
        except Exception as e:  # noqa: BLE001 - one bad image is reported; the batch goes on
            report.error(item, error_fields(e))
            continue
        report.result(item, fields, time.perf_counter() - started)
    report.interrupted = stop.requested
    return report.summary()
