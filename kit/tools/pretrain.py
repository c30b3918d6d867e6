"""`kit pretrain`: the stage-2 starting checkpoint the demo fine-tunes from, made by one command.

On two CPU cores no classifier learns to see fractures inside the demo's minutes from ImageNet weights alone
(`kit bench learn`, docs/benchmarks.md). So the kit trains its demo classifier's architecture once, at length,
on a large synthetic set of its own seed (never a demo seed), and ships the result small (half precision, in
`kit/models/weights/`) with its provenance; `demo_cls` starts from it (`model.pretrained_weights: kit:<name>`).

    kit pretrain --out runs/cls_start                 # set, crops, training, held-out figures, export

Steps, each kept and reused by a second run (a killed run resumes where it stopped):

1. a synthetic set at `grid` px (`<out>/data`, its answers in `<out>/answers`), every study segmented;
2. `n_folds` folds of it (`<out>/folds.csv`); fold `fold` is held out and scored, the rest train;
3. crops from the truth at the config's size (`<out>/crops<size>`);
4. one training run of the config (`start_cls`) on the training folds (`<out>/runs/<name>/fold<k>`);
5. the held-out fold scored as `kit bench learn` scores (patient and vertebra AUC with bootstrap intervals,
   by fracture kind, the score against the best constant);
6. the EMA weights in half precision to `<export_dir>/<name>.pt` and their provenance to `<name>.json`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
from pathlib import Path

import pandas as pd
import torch

from ..io.rsna import UID

log = logging.getLogger("kit.tools.pretrain")

NAME = "cls_lite0_128"
CONFIG = "start_cls"
N_TRAIN, SEED, GRID, N_FOLDS, FOLD = 480, 1000, 256, 10, 0
DEMO_SEEDS = range(0, 100)  # kept for `kit demo --seed`: a starting checkpoint never sees the demo's studies


def _commit() -> str | None:
    """The kit's git commit, `+dirty` when its tracked files differ from it; None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here)
    except (OSError, subprocess.SubprocessError):
        return None
    return (head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None


def export_start(model_pt: Path, export_dir: Path, name: str, provenance: dict) -> tuple[Path, Path]:
    """Write a trained classifier's weights (`model.pt`) as a starting checkpoint: floating tensors in half
    precision (float64 buffers kept), `<name>.pt`, and `<name>.json` with the provenance, the architecture and
    the weights' sha256. Both written atomically."""
    from ..io.files import replace_atomic, write_text_atomic
    from ..submit.export import sha256_file

    ckpt = torch.load(model_pt, map_location="cpu", weights_only=False)
    state = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in ckpt["model"].items()}
    export_dir.mkdir(parents=True, exist_ok=True)
    weights = export_dir / f"{name}.pt"
    replace_atomic(weights, lambda tmp: torch.save(state, tmp))
    kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k not in ("pretrained_weights", "freeze_backbone")}
    meta = {"name": name, "model_name": ckpt["model_name"], "model_kwargs": kwargs,
            "image_size": int(ckpt["config"]["data"]["image_size"]), **provenance,
            "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    meta_path = export_dir / f"{name}.json"
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return weights, meta_path


def _starting_point(weights: str | None) -> dict:
    """What the training started from: the packaged ImageNet weights, or a shipped checkpoint (its sha256 and
    provenance, so a checkpoint trained on from another can be traced back to the first)."""
    from ..models.start import is_start, start_meta

    if weights and is_start(weights):
        meta = start_meta(weights)
        return {"weights": weights, "sha256": meta.get("sha256"), "command": meta.get("command"),
                "training": meta.get("training")}
    return {"weights": weights or "random"}


def pretrain(out: str | os.PathLike = "runs/cls_start", *, n_train: int = N_TRAIN, seed: int = SEED,
             grid: int = GRID, n_folds: int = N_FOLDS, fold: int = FOLD, epochs: int | None = None,
             config: str = CONFIG, name: str = NAME, export_dir: str | os.PathLike | None = None,
             workers: int | None = None, progress: bool = True, overrides: dict | None = None) -> dict:
    """Make the starting checkpoint (module docstring); returns its provenance.

    Args:
        out: working folder (set, crops, runs; reused and resumed).
        n_train, seed, grid: the synthetic set's studies, seed (not 0-99: the demo's) and pixel grid.
        n_folds, fold: the split; `fold` is held out and scored, the others train.
        epochs: training epochs (default: the config's).
        config: the training config (`start_cls`); its data paths are set to `out`.
        name: the checkpoint's name (`pretrained_weights: kit:<name>`).
        export_dir: where `<name>.pt/.json` go (default the package's `kit/models/weights/`, i.e. shipped).
        workers: processes making the set (default min(2, CPUs)).
        overrides: more config overrides (dotted keys), after the ones this function sets.

    Raises:
        ValueError: a demo seed, or a fold outside the split.
    """
    from ..evaluate.markdown import jsonable
    from .bench_learn import _train_labels, score_heldout
    from ..config import load_config
    from ..stage2.crop_cache import build_crops
    from .demo import environment
    from ..models.start import WEIGHTS_DIR
    from ..synthetic.score import read_answers
    from ..io.folds import folds_for
    from ..synthetic import make_dataset
    from ..train import fit_fold

    if seed in DEMO_SEEDS:
        raise ValueError(f"seed {seed} is kept for the demo (seeds {DEMO_SEEDS.start}-{DEMO_SEEDS.stop - 1}); a "
                         "starting checkpoint must never see the studies it is judged on: pick another")
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold {fold} is not in 0..{n_folds - 1}")
    out = Path(out)
    data, answers = out / "data", out / "answers"
    wanted = {"n_train": n_train, "seed": seed, "size": grid}
    if (answers / "summary.json").is_file():
        made = json.loads((answers / "summary.json").read_text())
        have = {"n_train": made.get("n_train"), "seed": made.get("seed"), "size": made.get("size")}
        if have != wanted:
            raise ValueError(f"{data} holds another set ({have}); asked for {wanted}: use another --out")
    else:
        log.info("pretrain: making %d studies at %d px with seed %d in %s", n_train, grid, seed, data)
        made = make_dataset(data, n_train=n_train, n_test=0, size=grid, seed=seed, seg_share=1.0, bbox_share=0.5,
                            answers_dir=answers, workers=workers, progress=progress)
    folds_csv = out / "folds.csv"
    table = folds_for(data, path=folds_csv, n_folds=n_folds)
    settings = {"data.data_root": str(data), "data.folds_csv": str(folds_csv), "data.n_folds": n_folds,
                 "data.fold": fold, "data.seg_runs": [], "data.true_masks": True, "out_dir": str(out / "runs"),
                 "name": name, "train.progress": progress}
    if epochs:
        settings.update({"train.epochs": epochs, "train.val_every": epochs})
    settings.update(overrides or {})
    cfg = load_config(config, **settings)
    cfg = load_config(config, **{"data.crop_dir": str(out / f"crops{cfg.data.image_size}"), **settings})
    crops = build_crops(cfg, split="train", progress=progress)
    if crops["failed"]:
        log.warning("pretrain: %d studies could not be cropped (left out): %s", crops["failed"],
                    list(crops["failures"].items())[:3])
    fit_fold(cfg)
    run_log = pd.read_csv(cfg.run_dir / "log.csv")
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str})
    labels = _train_labels(data, table, Path(cfg.data.crop_dir), fold)
    heldout = score_heldout(oof.assign(fold=fold), {fold: labels}, fractures=read_answers(answers),
                            lookalikes=pd.read_csv(answers / "lookalikes.csv", dtype={UID: str}), seed=seed)
    figures = {"studies": int(len(oof)), "patient_auc": heldout["patient"],
               "vertebra_auc_within_level": heldout["vertebra_level"],
               "by_kind_within_level": heldout.get("by_kind_level"), "score": heldout["score"],
               "best_constant": heldout["constant"], "score_minus_constant": heldout["score_minus_constant"]}
    command = (f"kit pretrain --out {out} --n-train {n_train} --seed {seed} --grid {grid} --n-folds {n_folds} "
               f"--fold {fold} --epochs {cfg.train.epochs} --config {config} --name {name}"
               + "".join(f" {k}={v}" for k, v in (overrides or {}).items()))
    provenance = {
        "command": command, "kit_commit": _commit(),
        "made": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "set": {"n_train": n_train, "seed": seed, "grid": grid, "difficulty": made.get("difficulty"),
                "seg_share": 1.0, "bbox_share": 0.5},
        "training": {"config": config, "epochs": int(cfg.train.epochs), "n_folds": n_folds, "held_out_fold": fold,
                     "train_studies": int(len(labels)), "minutes": round(float(run_log["seconds"].sum()) / 60, 1),
                     "from": _starting_point(cfg.model.pretrained_weights)},
        "held_out": jsonable(figures),
        "environment": environment(),
    }
    weights, meta = export_start(cfg.run_dir / "model.pt", Path(export_dir) if export_dir else WEIGHTS_DIR, name,
                                 provenance)
    log.info("pretrain: %s (%.1f MB) and %s", weights, weights.stat().st_size / 1e6, meta)
    return {**json.loads(meta.read_text()), "path": str(weights)}
