"""Weights under a non-commercial licence (OpenLRM, CC BY-NC 4.0) run only once the licence is accepted;
the acceptance is remembered per licence in the user's config folder (a temporary one in every test)."""

import json

import pytest
from support import OPENLRM_TINY, TINY, run_backend

from backend import licences
from backend.errors import LicenceNotAccepted
from backend.models import registry
from backend.options import Options
from backend.pipeline import generate

IMAGE = OPENLRM_TINY / "input.png"
THRESHOLD = 0.365  # the tiny models' density is far below the real models' default, 3.0


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    monkeypatch.setenv(licences.CONFIG_DIR_ENV, str(folder))
    return folder


def generate_openlrm(tmp_path, *extra, config):
    return run_backend("generate", IMAGE, "-o", tmp_path / "m.npz", "--model", "openlrm-small", "--weights",
                       OPENLRM_TINY, "--resolution", 32, "--threshold", THRESHOLD, "--no-remove-background", *extra,
                       env={licences.CONFIG_DIR_ENV: str(config)})


def test_registry_licences():
    assert registry.get("triposr").licence == "MIT" and not licences.get("MIT").needs_acceptance
    openlrm_ids = [m for m in registry.MODELS if m.startswith("openlrm-")]
    assert sorted(openlrm_ids) == sorted(f"openlrm-{d}-{s}" for d in ("obj", "mix") for s in ("small", "base", "large"))
    for model_id in openlrm_ids:
        spec = registry.get(model_id)
        assert spec.licence == "CC-BY-NC-4.0" and licences.get(spec.licence).needs_acceptance
        assert (spec.default_resolution, spec.default_threshold) == (384, 3.0)
        assert spec.repo == f"zxhezexin/{model_id}-1.1" and spec.file_names == ("config.json", "model.safetensors")
    assert registry.get("openlrm-base") is registry.get("openlrm-mix-base")
    assert [registry.get(f"openlrm-{s}").default_source_size for s in ("small", "base", "large")] == [224, 336, 448]
    assert registry.get("openlrm-obj-base").files[1].size == 1_040_854_744
    assert licences.get("Some-Unknown-1.0").needs_acceptance  # unknown licences are asked about


def test_cli_refuses_until_accepted_then_remembers(tmp_path):
    config = tmp_path / "config"
    r = generate_openlrm(tmp_path, config=config)
    assert r.returncode == 4, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Creative Commons Attribution-NonCommercial 4.0" in error[0]
    assert "CC-BY-NC-4.0" in error[0] and "creativecommons.org/licenses/by-nc/4.0" in error[0]
    assert "--accept-licence" in r.stderr and str(config / "accepted_licences.json") in r.stderr
    assert not (tmp_path / "m.npz").exists() and not config.exists()

    r = generate_openlrm(tmp_path, "--accept-licence", config=config)
    assert r.returncode == 0, r.stderr
    assert "Non-commercial use only" in r.stderr and "accepted; remembered in" in r.stderr
    record = json.loads((config / "accepted_licences.json").read_text())
    assert record["CC-BY-NC-4.0"]["first_model"] == "openlrm-mix-small"

    r = generate_openlrm(tmp_path, config=config)  # remembered: no flag needed, no notice again
    assert r.returncode == 0, r.stderr
    assert "Non-commercial" not in r.stderr


def test_cli_json_error_has_the_licence_code(tmp_path):
    r = generate_openlrm(tmp_path, "--json", config=tmp_path / "config")
    assert r.returncode == 4
    assert json.loads(r.stdout)["error"]["code"] == "licence_not_accepted"


def test_mit_model_needs_no_acceptance(tmp_path):
    r = run_backend("generate", TINY / "input_rgba.png", "-o", tmp_path / "m.npz", "--weights", TINY,
                    "--resolution", 32, env={licences.CONFIG_DIR_ENV: str(tmp_path / "config")})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "config").exists()


def test_download_asks_too(tmp_path):
    env = {licences.CONFIG_DIR_ENV: str(tmp_path / "config"), "IMAGE_TO_3D_MODELS": str(tmp_path / "store")}
    r = run_backend("download", "--model", "openlrm-base", "--offline", env=env)
    assert r.returncode == 4 and "--accept-licence" in r.stderr
    r = run_backend("download", "--model", "openlrm-base", "--offline", "--accept-licence", env=env)
    assert r.returncode == 3 and "online access is off" in r.stderr  # past the licence, stopped by --offline
    assert (tmp_path / "config" / "accepted_licences.json").is_file()


def test_pipeline_checks_before_any_work(config_dir, tmp_path):
    with pytest.raises(LicenceNotAccepted) as e:
        generate(tmp_path / "missing.png", Options(model="openlrm-base", weights=str(OPENLRM_TINY / "packed")))
    assert e.value.code == "licence_not_accepted" and e.value.exit_status == 4
    mesh = generate(IMAGE, Options(model="openlrm-base", weights=str(OPENLRM_TINY / "packed"), resolution=32,
                                   threshold=THRESHOLD, remove_background=False, accept_licence=True))
    assert len(mesh.faces) > 0 and "CC-BY-NC-4.0" in licences.accepted()


def test_config_dir_and_unreadable_file(tmp_path, monkeypatch):
    monkeypatch.delenv(licences.CONFIG_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(licences.sys, "platform", "linux")
    assert licences.config_dir() == tmp_path / "home" / ".config" / "image_to_3d"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert licences.config_dir() == tmp_path / "xdg" / "image_to_3d"
    monkeypatch.setenv(licences.CONFIG_DIR_ENV, str(tmp_path / "mine"))
    assert licences.acceptance_file() == tmp_path / "mine" / "accepted_licences.json"

    licences.acceptance_file().parent.mkdir(parents=True)
    licences.acceptance_file().write_text("{not json")
    assert licences.accepted() == {}  # unreadable: not accepted, and rewritten on acceptance
    with pytest.raises(LicenceNotAccepted):
        licences.ensure_accepted("CC-BY-NC-4.0", "openlrm-mix-base", "OpenLRM Base (mix)")
    assert licences.accept("CC-BY-NC-4.0", "openlrm-mix-base") is True
    assert licences.accept("CC-BY-NC-4.0", "openlrm-mix-base") is False
    licences.ensure_accepted("CC-BY-NC-4.0", "openlrm-obj-large", "OpenLRM Large (obj)")  # per licence
    assert [p.name for p in licences.acceptance_file().parent.iterdir()] == ["accepted_licences.json"]
