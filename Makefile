# Image to 3D: set-up, tests, the extension package and the demo. Needs Python 3.11 (the worker, bpy 4.2 and
# 4.5) and Python 3.13 (bpy 5.2: PYTHON313=..., else python3.13 on PATH, else pyenv's newest 3.13).
#   make venv       backend environment (.venv: torch CPU + backend, Ray extra and test requirements)
#   make test       plain pytest suite, then the bpy suites under Blender 4.2, 4.5 and 5.2 LTS (each its own
#                   venv and process). Without Python 3.13 it warns that 5.2 was not tested and fails, unless
#                   ALLOW_MISSING_BLENDER=1 (then it still warns)
#   make extension  dist/image_to_3d-<version>.zip, built and validated by Blender's own tool
#   make demo       Generate 3D in headless Blender on examples/chair.png -> out/demo.{blend,glb,png}

PYTHON ?= python3.11
TORCH_VERSION := 2.13.0
BPY42_VERSION := 4.2.23
BPY45_VERSION := 4.5.15
BPY52_VERSION := 5.2.3
# Python 3.13 for bpy 5.2. Each candidate must really start as 3.13: a pyenv shim named python3.13 can
# be on PATH without 3.13 being enabled.
ifeq ($(origin PYTHON313), undefined)
PYTHON313 := $(shell for p in python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3.13 \
    2>/dev/null | sort -rV); do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1 \
    && { command -v "$$p"; break; }; done)
endif
export PYTHON313  # tests/test_install.py installs the backend's requirements with the same one
ALLOW_MISSING_BLENDER ?=
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' blender_manifest.toml)
ZIP := dist/image_to_3d-$(VERSION).zip
# Blender's extension tool, from the 4.2 wheel (the oldest Blender we support validates strictest).
BL_SCRIPTS := .venv-bpy42/lib/python3.11/site-packages/bpy/4.2/scripts
BLENDER_EXT := $(BL_SCRIPTS)/addons_core/bl_pkg/cli/blender_ext.py
VALID_TAGS := $(BL_SCRIPTS)/modules/_bpy_internal/extensions/tags.py
PYTEST_ARGS ?=

.PHONY: venv venv-bpy42 venv-bpy45 venv-bpy52 test test-plain test-bpy42 test-bpy45 test-bpy52 extension \
    validate demo clean

venv: .venv/.installed
venv-bpy42: .venv-bpy42/.installed
venv-bpy45: .venv-bpy45/.installed
venv-bpy52: .venv-bpy52/.installed

.venv/.installed: backend/requirements.txt backend/requirements-ray.txt backend/requirements-serve.txt requirements-test.txt
	test -x .venv/bin/python || $(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet torch==$(TORCH_VERSION)
	.venv/bin/pip install --quiet -r backend/requirements.txt -r backend/requirements-ray.txt -r backend/requirements-serve.txt -r requirements-test.txt
	touch $@

.venv-bpy42/.installed:
	test -x .venv-bpy42/bin/python || $(PYTHON) -m venv .venv-bpy42
	.venv-bpy42/bin/pip install --quiet bpy==$(BPY42_VERSION) "numpy<2" "pytest>=8,<10"
	touch $@

.venv-bpy45/.installed:
	test -x .venv-bpy45/bin/python || $(PYTHON) -m venv .venv-bpy45
	.venv-bpy45/bin/pip install --quiet bpy==$(BPY45_VERSION) "pytest>=8,<10"
	touch $@

.venv-bpy52/.installed:
	@test -n "$(PYTHON313)" || { echo "no Python 3.13 found for bpy $(BPY52_VERSION); set PYTHON313" >&2; exit 1; }
	test -x .venv-bpy52/bin/python || $(PYTHON313) -m venv .venv-bpy52
	.venv-bpy52/bin/pip install --quiet bpy==$(BPY52_VERSION) "pytest>=8,<10"
	touch $@

# The LTS lines a studio runs. 5.2 comes last, so a missing Python 3.13 is the last word.
test: test-plain test-bpy42 test-bpy45 test-bpy52

# The bpy venvs too: tests/test_mesh_io.py imports our GLB/OBJ/PLY with Blender's own importers (4.2, 4.5).
test-plain: venv gltf-validator venv-bpy42 venv-bpy45
	.venv/bin/python -m pytest tests --ignore=tests/blender -q $(PYTEST_ARGS)

# Khronos glTF Validator (npm) for tests/test_mesh_io.py, in the ignored folder .gltf-validator/.
GLTF_VALIDATOR_VERSION := 2.0.0-dev.3.10
.PHONY: gltf-validator
gltf-validator: .gltf-validator/.installed-$(GLTF_VALIDATOR_VERSION)

.gltf-validator/.installed-$(GLTF_VALIDATOR_VERSION):
	npm install --prefix .gltf-validator --no-audit --no-fund --save-exact gltf-validator@$(GLTF_VALIDATOR_VERSION)
	touch $@

# Each Blender version in its own venv and its own pytest process; the worker runs in .venv.
test-bpy42: venv venv-bpy42
	.venv-bpy42/bin/python -m pytest tests/blender -q $(PYTEST_ARGS)

test-bpy45: venv venv-bpy45
	.venv-bpy45/bin/python -m pytest tests/blender -q $(PYTEST_ARGS)

MISSING_52 := WARNING: Blender $(BPY52_VERSION) was NOT tested: no Python 3.13 found (bpy $(BPY52_VERSION) is \
    cp313 only). Looked for python3.13 on PATH and under $${PYENV_ROOT:-$$HOME/.pyenv}/versions; set PYTHON313=/path/to/python3.13
ifeq ($(PYTHON313),)
test-bpy52:
	@echo "********************************************************************************" >&2
	@echo "$(MISSING_52)" >&2
	@echo "********************************************************************************" >&2
	@test "$(ALLOW_MISSING_BLENDER)" = 1 || \
	    { echo "make: failing for that; ALLOW_MISSING_BLENDER=1 accepts it" >&2; exit 1; }
else
test-bpy52: venv venv-bpy52
	.venv-bpy52/bin/python -m pytest tests/blender -q $(PYTEST_ARGS)
endif

extension: venv-bpy42
	rm -rf dist && mkdir -p dist
	.venv-bpy42/bin/python $(BLENDER_EXT) build --source-dir . --output-dir dist --valid-tags $(VALID_TAGS)
	.venv-bpy42/bin/python $(BLENDER_EXT) validate --valid-tags $(VALID_TAGS) $(ZIP)
	@echo "built $(ZIP)"

validate: venv-bpy42
	.venv-bpy42/bin/python $(BLENDER_EXT) validate --valid-tags $(VALID_TAGS) .

# IMAGE_TO_3D_WEIGHTS=DIR picks the model folder; otherwise the official TripoSR weights are looked for.
demo: venv venv-bpy45
	.venv-bpy45/bin/python scripts/demo.py --image examples/chair.png --out out

clean:
	rm -rf dist out .pytest_cache

# The offline studio install (README "Offline studio install"):
#   make wheelhouse PLATFORM=windows-x64|macos-arm64|linux-x64 PYTHON=3.11|3.13
# fills wheels/<platform>-py<python>/ (ignored by git, left out of the extension) with every backend requirement
# but torch; `python -m backend install --wheels DIR` (or Install Backend with the Wheelhouse Folder) installs from
# it with no index. PYTHON here is the target's version (python3.11, the default, reads as 3.11).
#   make test-wheelhouse   builds linux-x64 wheelhouses (3.11, 3.13) and installs each offline (tests/test_wheelhouse.py)
PLATFORM ?= linux-x64
WHEELHOUSE_PYTHON := $(patsubst python%,%,$(notdir $(PYTHON)))
.PHONY: wheelhouse test-wheelhouse
wheelhouse:
	@test -x .venv/bin/python || { echo "make venv first (the wheelhouse is resolved with .venv's pip)" >&2; exit 1; }
	.venv/bin/python scripts/wheelhouse.py --platform $(PLATFORM) --python $(WHEELHOUSE_PYTHON) --torch $(TORCH_VERSION)

test-wheelhouse: venv
	IMAGE_TO_3D_WHEELHOUSE_TESTS=1 .venv/bin/python -m pytest tests/test_wheelhouse.py -q $(PYTEST_ARGS)

# The device check (scripts/device_check.py): on a GPU machine that has only a Python with torch and no network,
#   make device-wheels            here, beforehand: the check's other requirements as wheels for that Python in
#                                 .device-wheels/ (ignored; under 64 MB: no scipy (PyMCubes needs it), ray, onnxruntime, rembg, trimesh,
#                                 post-processing), with shaped_triposr_ckpt.py and its two fixture files
#   make device-check             there: installs them offline, runs the check, writes $(DEVICE_OUT)
# DEVICE_PYTHON_VERSION/DEVICE_PLATFORM: that machine's Python and platform. Without a GPU the check runs the tiny
# fixtures on the CPU (tests/test_device_check.py does so in CI).
DEVICE_PYTHON ?= python3
DEVICE_PYTHON_VERSION ?= 3.11
DEVICE_PLATFORM ?= manylinux_2_28_x86_64
DEVICE_OUT ?= $(if $(OUT),$(OUT),out/device-check)
DEVICE_REQUIREMENTS := "numpy>=1.26,<3" "pillow>=10.1,<14" "PyYAML>=6.0,<7" "psutil>=5.9,<8" \
    "safetensors>=0.4.3,<0.9" diffusers==0.42.1 transformers==5.23.0 "pytest>=8,<10"
SHARED ?= ../shared
.PHONY: device-wheels device-check

device-wheels:
	rm -rf .device-wheels && mkdir -p .device-wheels/shared/tools .device-wheels/shared/fixtures/triposr/official
	$(if $(wildcard .venv/bin/python),.venv/bin/python,$(PYTHON)) -m pip download --quiet --only-binary=:all: --implementation cp --python-version $(DEVICE_PYTHON_VERSION) \
	    --platform $(DEVICE_PLATFORM) --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	    -d .device-wheels $(DEVICE_REQUIREMENTS)
	cp $(SHARED)/tools/shaped_triposr_ckpt.py .device-wheels/shared/tools/
	cp $(SHARED)/fixtures/triposr/state_dict_manifest.json .device-wheels/shared/fixtures/triposr/
	cp $(SHARED)/fixtures/triposr/official/config.semantic.yaml .device-wheels/shared/fixtures/triposr/official/
	@du -sh .device-wheels; test $$(du -sm .device-wheels | cut -f1) -lt 64 || { echo ".device-wheels is 64 MB or more" >&2; exit 1; }

device-check:
	test ! -d .device-wheels || $(DEVICE_PYTHON) -m pip install --quiet --no-index --find-links .device-wheels $(DEVICE_REQUIREMENTS)
	$(DEVICE_PYTHON) scripts/device_check.py --out $(DEVICE_OUT)
