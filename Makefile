# Image to 3D: set-up, tests, the extension package and the demo. Needs Python 3.11 (bpy wheels are cp311).
#   make venv       backend environment (.venv: torch CPU + backend and test requirements)
#   make test       plain pytest suite, then the bpy suites under Blender 4.2 LTS and 5.0 (each its own venv)
#   make extension  dist/image_to_3d-<version>.zip, built and validated by Blender's own tool
#   make demo       Generate 3D in headless Blender on examples/chair.png -> out/demo.{blend,glb,png}

PYTHON ?= python3.11
TORCH_VERSION := 2.13.0
BPY42_VERSION := 4.2.23
BPY50_VERSION := 5.0.1
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' blender_manifest.toml)
ZIP := dist/image_to_3d-$(VERSION).zip
# Blender's extension tool, from the 4.2 wheel (the oldest Blender we support validates strictest).
BL_SCRIPTS := .venv-bpy42/lib/python3.11/site-packages/bpy/4.2/scripts
BLENDER_EXT := $(BL_SCRIPTS)/addons_core/bl_pkg/cli/blender_ext.py
VALID_TAGS := $(BL_SCRIPTS)/modules/_bpy_internal/extensions/tags.py
PYTEST_ARGS ?=

.PHONY: venv venv-bpy42 venv-bpy50 test test-plain test-bpy42 test-bpy50 extension validate demo clean

venv: .venv/.installed
venv-bpy42: .venv-bpy42/.installed
venv-bpy50: .venv-bpy50/.installed

.venv/.installed: backend/requirements.txt requirements-test.txt
	test -x .venv/bin/python || $(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet torch==$(TORCH_VERSION)
	.venv/bin/pip install --quiet -r backend/requirements.txt -r requirements-test.txt
	touch $@

.venv-bpy42/.installed:
	test -x .venv-bpy42/bin/python || $(PYTHON) -m venv .venv-bpy42
	.venv-bpy42/bin/pip install --quiet bpy==$(BPY42_VERSION) "numpy<2" "pytest>=8,<10"
	touch $@

.venv-bpy50/.installed:
	test -x .venv-bpy50/bin/python || $(PYTHON) -m venv .venv-bpy50
	.venv-bpy50/bin/pip install --quiet bpy==$(BPY50_VERSION) "pytest>=8,<10"
	touch $@

test: test-plain test-bpy42 test-bpy50

# The bpy venvs too: tests/test_mesh_io.py imports our GLB/OBJ/PLY with Blender's own importers.
test-plain: venv gltf-validator venv-bpy42 venv-bpy50
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

test-bpy50: venv venv-bpy50
	.venv-bpy50/bin/python -m pytest tests/blender -q $(PYTEST_ARGS)

extension: venv-bpy42
	rm -rf dist && mkdir -p dist
	.venv-bpy42/bin/python $(BLENDER_EXT) build --source-dir . --output-dir dist --valid-tags $(VALID_TAGS)
	.venv-bpy42/bin/python $(BLENDER_EXT) validate --valid-tags $(VALID_TAGS) $(ZIP)
	@echo "built $(ZIP)"

validate: venv-bpy42
	.venv-bpy42/bin/python $(BLENDER_EXT) validate --valid-tags $(VALID_TAGS) .

# IMAGE_TO_3D_WEIGHTS=DIR picks the model folder; otherwise the official TripoSR weights are looked for.
demo: venv venv-bpy50
	.venv-bpy50/bin/python scripts/demo.py --image examples/chair.png --out out

clean:
	rm -rf dist out .pytest_cache
