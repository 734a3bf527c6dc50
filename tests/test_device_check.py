"""scripts/device_check.py as CI runs it: no GPU, so the tiny fixtures on the CPU, every step, one JSON and a table."""

import json
import subprocess
import sys

from support import ROOT


def test_device_check_runs_on_the_cpu_with_the_tiny_models(tmp_path):
    r = subprocess.run([sys.executable, "scripts/device_check.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["tiny"] and report["cuda_tests"]["ok"]
    assert "tests/test_surface.py::test_on_cuda_the_same_as_dense_on_cuda" in report["cuda_tests"]["ids"]
    rows = {row["model"]: row for row in report["models"]}
    assert list(rows) == ["triposr", "openlrm", "instantmesh", "zero123pp"]
    for name, row in rows.items():
        assert "error" not in row, row
        if name == "zero123pp":
            assert row["difference"]["views_max"] == 0 and row["fp32"]["steps_per_s"] > 0
        else:  # auto is fp32 on the CPU: the same mesh
            assert row["auto_is"] == "fp32" and row["difference"]["hausdorff"] == 0 and row["fp32"]["faces"] > 100
    table = (tmp_path / "device_check.md").read_text()
    assert "| model |" in table and table.count("\n| ") >= 5
    assert not list(tmp_path.glob(".*.partial"))
