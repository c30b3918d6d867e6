"""Starting checkpoints the kit ships: `model.pretrained_weights: kit:<name>`.

A starting checkpoint is a whole classifier the kit trained once (`kit pretrain`) on a large synthetic set of
its own seed, from the packaged ImageNet weights, and ships inside the package (`kit/models/weights/`): the
weights in half precision (`<name>.pt`) beside their provenance (`<name>.json`: the command that makes them,
the commit, the set, the epochs, the held-out figures, the sha256 of the weights file, and the model's
architecture and input scaling). A run that names one starts from it and fine-tunes:

    path = start_weights("cls_lite0_128")        # kit/models/weights/cls_lite0_128.pt (sha256 checked)
    meta = start_meta("cls_lite0_128")           # provenance + {"encoder", "model_kwargs", "input_scaling"}

The config must build the same architecture (encoder, channels, GRU width); `kit.config` checks it and gives
the model the input scaling the checkpoint was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..submit.export import sha256_file

PREFIX = "kit:"  # `pretrained_weights: kit:<name>` selects a shipped starting checkpoint
WEIGHTS_DIR = Path(__file__).with_name("weights")


def is_start(value: str | None) -> bool:
    """True for a `pretrained_weights` value naming a shipped starting checkpoint (`kit:<name>`)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def start_names() -> list[str]:
    """The shipped starting checkpoints (names without the `kit:` prefix), sorted."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if (WEIGHTS_DIR / f"{p.stem}.pt").is_file())


def _name(value: str) -> str:
    name = value.removeprefix(PREFIX)
    if name not in start_names():
        raise ValueError(f"no shipped starting checkpoint {value!r}; shipped: "
                         f"{', '.join(PREFIX + n for n in start_names()) or 'none'} (made by `kit pretrain`)")
    return name


def start_meta(value: str) -> dict:
    """The provenance and architecture of a shipped starting checkpoint (`kit:<name>` or `<name>`)."""
    name = _name(value)
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def start_weights(value: str) -> Path:
    """The weights file of a shipped starting checkpoint, after checking it is the file its provenance names.

    Raises:
        ValueError: an unknown name (the shipped ones are listed), or a file whose sha256 differs from its
            provenance's (a damaged or replaced file).
    """
    name = _name(value)
    path = WEIGHTS_DIR / f"{name}.pt"
    expected = start_meta(name).get("sha256")
    if expected and sha256_file(path) != expected:
        raise ValueError(f"{path}: its sha256 is not the one {name}.json records; reinstall the kit or run the "
                         f"command in {name}.json to make it again")
    return path


def training_runs(meta: dict) -> int:
    """How many `kit pretrain` runs made a starting checkpoint: 1, plus one for each earlier checkpoint its
    provenance says a run trained on from (`training.from`, nested)."""
    runs, link = 1, meta.get("training", {}).get("from")
    while isinstance(link, dict):
        runs, link = runs + 1, link.get("training", {}).get("from")
    return runs
