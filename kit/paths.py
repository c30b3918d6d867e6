"""Where the competition data is: Kaggle, Colab or a local folder, found by one function."""

from __future__ import annotations

import os
from pathlib import Path

from .constants import KAGGLE_COMPETITION

KAGGLE_ROOT = Path("/kaggle/input") / KAGGLE_COMPETITION
COLAB_ROOTS = (Path("/content") / KAGGLE_COMPETITION, Path("/content/drive/MyDrive") / KAGGLE_COMPETITION)
ENV_VAR = "KIT_DATA_ROOT"

PathLike = str | os.PathLike  #: what the kit takes for a path


def _looks_like_root(path: Path) -> bool:
    return (path / "train.csv").is_file() or (path / "test.csv").is_file()


def find_data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the competition data root.

    Order: the explicit `root`, then `$KIT_DATA_ROOT`, then Kaggle's input mount, then the Colab locations,
    then `./data` and `./demo/data`. A folder counts when it holds `train.csv` or `test.csv`.

    Raises:
        FileNotFoundError: naming every place looked at.
    """
    if root is not None:
        path = Path(root).expanduser()
        if not _looks_like_root(path):
            raise FileNotFoundError(f"{path} holds neither train.csv nor test.csv: not an RSNA data root")
        return path
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]).expanduser())
    candidates += [KAGGLE_ROOT, *COLAB_ROOTS, Path("data"), Path("demo") / "data"]
    for path in candidates:
        if _looks_like_root(path):
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no RSNA data root found; looked at: {looked}. Pass root= or set ${ENV_VAR}.")


def on_kaggle() -> bool:
    """True inside a Kaggle kernel."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or Path("/kaggle/input").is_dir()
