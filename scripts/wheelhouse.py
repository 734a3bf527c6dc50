"""``make wheelhouse PLATFORM=windows-x64|macos-arm64|linux-x64 PYTHON=3.11|3.13``: every backend requirement but
torch (its dependencies included), as wheels for that platform and Python, in ``wheels/<platform>-py<python>/`` (ignored by git, left out of
the extension's zip), for ``python -m backend install --wheels DIR`` on a machine without internet.

pip resolves for another platform (``--platform``, ``--python-version``, ``--only-binary=:all:``) but judges
environment markers by the machine it runs on, so a Windows wheelhouse made on Linux would lack ``colorama``
(click and tqdm need it there) and could hold packages only Linux needs. Here the markers are judged for the
target: pip resolves, the requirements the target's markers add are fed back until nothing is missing, and only
what the target's markers reach from backend/requirements.txt is kept. ``--dry-run``: resolve (pip's report, from
the index's metadata) and print the list, download nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "backend" / "requirements.txt"


def _manylinux(arch: str, newest: int = 28) -> list:
    """Blender's glibc floor is 2.28: manylinux_2_17..2_28 (and the legacy aliases pip expands 2014 into)."""
    return [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 16, -1)] + [f"manylinux2014_{arch}"]


# name: (pip --platform values, the marker variables of the target). macOS: 13 is onnxruntime's floor on Apple
# Silicon (pip takes wheels for that version and older).
TARGETS = {
    "windows-x64": (["win_amd64"], dict(sys_platform="win32", platform_system="Windows", platform_machine="AMD64",
                                        os_name="nt")),
    "macos-arm64": (["macosx_13_0_arm64"], dict(sys_platform="darwin", platform_system="Darwin",
                                                 platform_machine="arm64", os_name="posix")),
    "linux-x64": (_manylinux("x86_64"), dict(sys_platform="linux", platform_system="Linux",
                                             platform_machine="x86_64", os_name="posix")),
}
PYTHONS = ("3.11", "3.13")


def marker_environment(platform: str, python: str) -> dict:
    return {**default_environment(), **TARGETS[platform][1], "python_version": python,
            "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_release": "", "platform_version": ""}


def top_requirements(environment: dict) -> list[Requirement]:
    """backend/requirements.txt for the target, torch left out (it comes from PyTorch's index, per machine)."""
    found = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            if canonicalize_name(r.name) != "torch" and (r.marker is None or r.marker.evaluate({**environment,
                                                                                                 "extra": ""})):
                found.append(r)
    return found


def pip_platform_args(platform: str, python: str) -> list:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in TARGETS[platform][0]:
        args += ["--platform", tag]
    return args


def _plain(r: Requirement) -> str:
    """The requirement without its marker (pip would judge that by this machine)."""
    extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
    return f"{r.name}{extras}{r.specifier}"


def _pip_resolve(lines: list, platform: str, python: str, no_deps: bool = False) -> dict:
    """pip's resolution for the target: {name: (version, [Requires-Dist])}, from its report (metadata only)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        (Path(tmp) / "requirements.txt").write_text("\n".join(lines) + "\n")
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                              "--report", report, "--target", Path(tmp) / "target", *pip_platform_args(platform, python),
                              *(["--no-deps"] if no_deps else []),
                              "-r", Path(tmp) / "requirements.txt"], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"wheelhouse: pip could not resolve the requirements for {platform}, Python {python}:\n"
                     f"{run.stderr[-3000:]}")
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): (i["metadata"]["version"], i["metadata"].get("requires_dist")
                                                       or []) for i in items}


# torch's own wheel is the machine's choice (CPU, CUDA, ROCm: README), so it is left out; its plain dependencies
# (sympy, jinja2, setuptools...) are kept, which pip needs beside whichever torch wheel is put in. The CUDA
# libraries a CUDA build pulls from the index are left out too: they go with that wheel (README).
def _left_out(name: str) -> bool:
    return name == "torch" or name.startswith(("nvidia-", "cuda-")) or name in ("triton", "pytorch-triton")


def resolve(platform: str, python: str, torch: str) -> dict:
    """{name: version}: the target's whole closure, judged by the target's markers."""
    environment = marker_environment(platform, python)
    # torch's requirements from its metadata alone: given torch, pip would also chase its Linux-only CUDA
    # libraries (by this machine's markers) and fail for another platform. Its wheels all declare the same
    # requirements, with markers, so those of the Linux wheel (the index has it for every Python) serve for all
    # (macOS's wheel needs a newer macOS than the wheelhouse's floor).
    torch_requires = _pip_resolve([f"torch=={torch}"], "linux-x64", python, no_deps=True)["torch"][1]
    roots = top_requirements(environment) + [
        r for r in map(Requirement, torch_requires) if not _left_out(canonicalize_name(r.name))
        and (r.marker is None or r.marker.evaluate({**environment, "extra": ""}))]
    extra_lines: list[str] = []
    for _ in range(6):
        resolved = _pip_resolve([_plain(r) for r in roots] + extra_lines, platform, python)
        reached, gaps = _walk(roots, resolved, environment)
        if not gaps:
            return {name: resolved[name][0] for name in sorted(reached) if not _left_out(name)}
        extra_lines += [_plain(r) for r in gaps]
    sys.exit(f"wheelhouse: the requirements for {platform} did not settle: {', '.join(map(str, gaps))}")


def _walk(roots: list, resolved: dict, environment: dict):
    """From the roots, the packages the target's markers reach, and the requirements pip's resolution lacks."""
    seen: dict[str, set] = {}  # name -> the extras whose requirements were followed ("" for the plain ones)
    gaps = []
    queue = list(roots)
    while queue:
        r = queue.pop()
        name = canonicalize_name(r.name)
        if name not in resolved:
            gaps.append(r)
            continue
        version, requires = resolved[name]
        if not r.specifier.contains(version, prereleases=True):
            sys.exit(f"wheelhouse: {r} is needed but pip chose {name} {version}")
        todo = ({""} | set(r.extras)) - seen.setdefault(name, set())
        seen[name] |= todo
        for line in requires if todo else ():
            dep = Requirement(line)
            if _left_out(canonicalize_name(dep.name)):
                continue
            if dep.marker is None or any(dep.marker.evaluate({**environment, "extra": e}) for e in todo):
                queue.append(dep)
    return seen, gaps


def download(pins: dict, platform: str, python: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dest,
                          *pip_platform_args(platform, python), *(f"{n}=={v}" for n, v in pins.items())])
    if run.returncode != 0:
        sys.exit(f"wheelhouse: pip download failed for {platform}, Python {python}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/wheelhouse.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", required=True, choices=sorted(TARGETS))
    p.add_argument("--python", required=True, choices=PYTHONS)
    p.add_argument("--torch", default="2.13.0", help="the torch version whose dependencies are included")
    p.add_argument("--dest", help="folder for the wheels (default: wheels/<platform>-py<python>)")
    p.add_argument("--dry-run", action="store_true", help="resolve and print the pins; download nothing")
    args = p.parse_args(argv)
    pins = resolve(args.platform, args.python, args.torch)
    if args.dry_run:
        print(json.dumps(pins, indent=1))
        return 0
    dest = Path(args.dest or ROOT / "wheels" / f"{args.platform}-py{args.python}")
    download(pins, args.platform, args.python, dest)
    print(f"wheelhouse: {len(pins)} wheels for {args.platform}, Python {args.python} in {dest}; add a torch wheel "
          f"for the machines (from https://download.pytorch.org/whl/) to install torch from it too", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
