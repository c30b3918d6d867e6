"""`kit bench learn`: does the stage-2 classifier learn, and which lever makes it learn?

For each named setting (`SETTINGS`: the source pixel grid, the crop size, the backbone and its weights, the
epochs, the share of the training studies, one lever at a time from `base`, today's demo), on synthetic sets made
for the bench (their own seed, never the demo's; every study segmented, so crops come from the truth):

1. `kit.synthetic.make_dataset(..., size=<grid>, seed=<seed>, seg_share=1.0)` writes the set and its answers;
2. `kit.stage2.crop_cache.build_crops` cuts every study's vertebra stacks from the ground-truth masks
   (`data.true_masks`, no stage-1 runs) at the setting's crop size;
3. `kit.train.fit_fold(load_config("demo_cls", **overrides))` trains each asked fold (one torch thread, validated
   once, after the last epoch: nothing is chosen on the held-out studies);
4. the held-out studies' OOF rows (`runs/<...>/fold<k>/oof.csv`) are scored: patient and vertebra AUC, the AUC of
   the fractured vertebrae of each kind against the intact ones (the generator's answers, `fractures.csv`), of the
   intact vertebrae with a look-alike against those without, each with a bootstrap 90 % interval over studies
   (`bootstrap_auc`); the vertebra figures pooled over levels as the metric pools them (where the level's
   prevalence alone ranks C7 above C3: the constant's AUC is given beside it) and within levels (each positive
   ranked only against negatives of its own level: what the model reads from the image); and the competition
   score against the best constant of each fold's training labels (`kit.evaluate.metrics.best_constant` at
   `effective_odds`), the difference with its interval;
5. a gallery of the positive slices (slice target 1) as the model gets them, the fracture boxes drawn
   (`plot_positive_gallery`).

A set is made once per (grid, seed, studies) and its crops once per crop size, under `--out`, and shared by the
settings that need them; a finished training run is read back, not trained again. Grids of one seed hold the same
studies with the same labels (the generator draws them before the pixels), so every setting is scored on the same
held-out studies: the folds table is made once and shared. Outputs: `bench_learn.json` (written after every
setting), `galleries/<setting>.png`, the printed table. Figures measured with it are in docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import PROB_CLIP, TARGETS, VERTEBRAE
from ..evaluate.bootstrap import LEVEL, N_BOOT, bootstrap_auc, bootstrap_mean
from ..evaluate.markdown import jsonable
from ..paths import PathLike

log = logging.getLogger("kit.tools.bench_learn")

UID = "StudyInstanceUID"
KINDS = ("hairline", "cleft", "displaced", "compression")  # kit.synthetic.FRACTURE_KINDS, subtlest first
LOOKALIKE = "lookalike"  # the AUC of intact vertebrae with a look-alike against intact ones without
RANDOM_ENCODER = "mobilenetv3_small_050"  # demo_cls's
IMAGENET_ENCODER = "tf_efficientnet_lite0"  # the smallest encoder with packaged ImageNet weights
START = "kit:cls_lite0_128"  # the shipped starting checkpoint (kit.models.start)


@dataclass(frozen=True)
class Setting:
    """One row of the bench: what it changes from `demo_cls` and from the bench's own defaults.

    Attributes:
        grid: in-plane pixels of the synthetic set (`make_dataset(size=...)`; 128 is the demo's, ~1.1 mm a pixel).
        crop: `data.image_size`, the crop's in-plane pixels (the box around a vertebra is ~70 mm).
        encoder: `model.encoder`.
        pretrained: `model.pretrained_weights` (None: random weights; "imagenet": the packaged ones).
        epoch_scale: epochs = round(the bench's epochs x this).
        train_share: share of each fold's training studies it trains on (a seeded subset; held out unchanged).
        what: one line on what it is.
        freeze: `model.freeze_backbone` (only the GRU, attention and heads learn).
        lr: `optim.lr` (None: demo_cls's).
        tta_flip: `data.tta_flip`, validation averaging each vertebra over its crops and their left-right mirror
            (demo_cls has it on; off for the settings measured before it was).
    """

    grid: int
    crop: int
    encoder: str = RANDOM_ENCODER
    pretrained: str | None = None
    epoch_scale: float = 1.0
    train_share: float = 1.0
    what: str = ""
    freeze: bool = False
    lr: float | None = None
    tta_flip: bool = False

    def describe(self) -> str:
        weights = {"imagenet": "ImageNet", None: "random"}.get(self.pretrained, self.pretrained)
        short = {RANDOM_ENCODER: "MNv3-s050", IMAGENET_ENCODER: "Lite0"}.get(self.encoder, self.encoder)
        extra = ((" frozen" if self.freeze else "") + (f" lr {self.lr:g}" if self.lr else "")
                 + (" flip TTA" if self.tta_flip else ""))
        return f"{self.grid}/{self.crop} {short} {weights}{extra}"


#: the settings, one lever at a time from `base` (today's demo: 128 px grid, 64 px crops, random MobileNetV3)
SETTINGS: dict[str, Setting] = {
    "base": Setting(128, 64, what="today's demo: 128 px grid, 64 px crops, random MobileNetV3"),
    "crop128": Setting(128, 128, what="base with 128 px crops (the 128 px grid upsampled)"),
    "lite0": Setting(128, 64, IMAGENET_ENCODER, "imagenet", what="base with Lite0 from ImageNet weights"),
    "lite0_long": Setting(128, 64, IMAGENET_ENCODER, "imagenet", epoch_scale=2.0,
                          what="lite0 with twice the epochs (the demo's data and crops)"),
    "base_long": Setting(128, 64, epoch_scale=4.0, what="base with four times the epochs"),
    "grid256": Setting(256, 64, what="base on a 256 px grid (~0.55 mm a pixel)"),
    "grid256_crop128": Setting(256, 128, what="256 px grid, 128 px crops, random MobileNetV3"),
    "grid256_crop128_long": Setting(256, 128, epoch_scale=4.0, what="grid256_crop128 with four times the epochs"),
    "lite0_128": Setting(256, 128, IMAGENET_ENCODER, "imagenet",
                         what="256 px grid, 128 px crops, Lite0 from ImageNet weights"),
    "lite0_96": Setting(256, 96, IMAGENET_ENCODER, "imagenet",
                        what="lite0_128 with 96 px crops (about 2.5x less compute)"),
    "lite0_128_long": Setting(256, 128, IMAGENET_ENCODER, "imagenet", epoch_scale=2.0,
                              what="lite0_128 with twice the epochs"),
    "lite0_128_half": Setting(256, 128, IMAGENET_ENCODER, "imagenet", train_share=0.5,
                              what="lite0_128 on half the training studies"),
    # from the shipped starting checkpoint (`kit pretrain`: the same architecture trained on 480 studies of
    # seed 1000), fine-tuned for 1 or 2 epochs (epoch_scale x the bench's 3)
    "start_as_is": Setting(256, 128, IMAGENET_ENCODER, START, epoch_scale=1 / 3, freeze=True, lr=1e-9, tta_flip=True,
                           what="kit:cls_lite0_128 as shipped (1 epoch at a learning rate of 1e-9: nothing moves but "
                                "the level offsets, set to the fold's prevalence), with the demo's flip TTA"),
    "start_as_is_noflip": Setting(256, 128, IMAGENET_ENCODER, START, epoch_scale=1 / 3, freeze=True, lr=1e-9,
                                  what="start_as_is without the flip TTA (the crops as they are only)"),
    "start_frozen": Setting(256, 128, IMAGENET_ENCODER, START, epoch_scale=1 / 3, freeze=True, tta_flip=True,
                            what="kit:cls_lite0_128, 1 epoch with the CNN frozen (GRU, attention, heads learn)"),
    "start_frozen2": Setting(256, 128, IMAGENET_ENCODER, START, epoch_scale=2 / 3, freeze=True, tta_flip=True,
                             what="start_frozen for 2 epochs"),
    "start_tuned": Setting(256, 128, IMAGENET_ENCODER, START, epoch_scale=1 / 3, lr=5e-4, tta_flip=True,
                           what="kit:cls_lite0_128, 1 epoch, everything learns at a quarter of the learning rate"),
}
DEFAULT_SETTINGS = ("base", "grid256_crop128", "lite0_128", "lite0_128_long")

#: the bench's defaults: 96 studies in 3 folds, folds 0 and 1 trained (64 training, 32 held-out studies each,
#: 64 held-out studies scored), 3 epochs
N_TRAIN, N_FOLDS, FOLDS, EPOCHS, SEED = 96, 3, (0, 1), 3, 101
#: `--quick`: a smoke run of seconds (12 studies of 64 slices at 64 px, 32 px crops, one fold, one epoch)
QUICK = {"n_train": 12, "n_folds": 3, "folds": (0,), "epochs": 1, "grid": 64, "crop": 32, "n_slices": 64,
         "n_boot": 200}
BASE_CONFIG = "demo_cls"


# ---------------------------------------------------------------------------------------------------------
# Pure pieces: bootstrap intervals of AUC and of a mean
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Scoring the held-out studies
# ---------------------------------------------------------------------------------------------------------


def vertebra_table(oof: pd.DataFrame, fractures: pd.DataFrame | None = None,
                   lookalikes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per held-out vertebra: StudyInstanceUID, vertebra, y (label), p (the model's C<i> probability),
    and with the answers one 0/1 column per fracture kind of `KINDS` (the vertebra has a fracture of that kind)
    and `lookalike` (a look-alike lies on it: a row naming it, or "all" for a study-wide one)."""
    rows = []
    for name in VERTEBRAE:
        rows.append(pd.DataFrame({UID: oof[UID].to_numpy(), "vertebra": name,
                                  "y": oof[f"{name}_true"].to_numpy(np.float64),
                                  "p": oof[name].to_numpy(np.float64)}))
    table = pd.concat(rows, ignore_index=True)
    key = list(zip(table[UID], table["vertebra"]))
    if fractures is not None:
        for kind in KINDS:
            have = set(zip(fractures.loc[fractures["kind"] == kind, UID], fractures.loc[fractures["kind"] == kind,
                                                                                         "vertebra"]))
            table[kind] = [int(k in have) for k in key]
    if lookalikes is not None:
        named = set(zip(lookalikes[UID], lookalikes["vertebra"].astype(str)))
        everywhere = set(lookalikes.loc[lookalikes["vertebra"].astype(str) == "all", UID])
        table[LOOKALIKE] = [int(k in named or k[0] in everywhere) for k in key]
    return table


def study_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N,) each study's row of the competition metric (`kit.evaluate.metrics.competition_score` of that study alone):
    their mean is the row-normalised score."""
    from ..evaluate.metrics import competition_score

    return np.array([competition_score(y[i:i + 1], p[i:i + 1]) for i in range(len(y))], dtype=np.float64)


def score_heldout(oof: pd.DataFrame, train_labels: dict[int, np.ndarray], *, fractures: pd.DataFrame | None = None,
                  lookalikes: pd.DataFrame | None = None, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = 0) -> dict:
    """Held-out figures of one setting, each with its bootstrap interval over studies.

    Args:
        oof: the OOF rows of every trained fold (a `fold` column, the TARGETS probabilities, `<target>_true`).
        train_labels: {fold: (n, 8) labels of the studies that fold's model trained on}: the constant.
        fractures: the generator's `fractures.csv` (`kit.synthetic.score.read_answers`), for the AUC by kind.
        lookalikes: its `lookalikes.csv`, for the look-alike AUC.

    Returns:
        `patient`, `vertebra` (AUC dicts of `bootstrap_auc`, every vertebra pooled as the metric pools them),
        `vertebra_level` (positives ranked only against negatives of their own level: what the model reads from the
        image beyond the level's prevalence; a model that knows only the level gets 0.5), `vertebra_constant` (the
        pooled AUC of the constant: the level prevalence alone ranks C7 above C3), `by_kind`, `by_kind_level`,
        `by_kind_constant` {kind: the same three for the fractured vertebrae of that kind against the intact ones},
        `lookalike`, `lookalike_level` (intact vertebrae with a look-alike against those without: 0.5 = not
        fooled), `score`, `constant` (the best constant of each fold's training labels, `best_constant` at
        `effective_odds`), `prevalence_constant` (the training prevalence, clipped to [PROB_CLIP, 1 - PROB_CLIP]),
        `score_minus_constant` (mean with interval: < 0 beats the constant), `n_studies`.
    """
    from ..evaluate.metrics import best_constant, effective_odds

    y = oof[[f"{t}_true" for t in TARGETS]].to_numpy(np.float64)
    p = oof[list(TARGETS)].to_numpy(np.float64)
    folds = oof["fold"].astype(int).to_numpy()
    best = np.stack([best_constant(train_labels[k].mean(0), effective_odds(train_labels[k])) for k in folds])
    plain = np.clip(np.stack([train_labels[k].mean(0) for k in folds]), PROB_CLIP, 1.0 - PROB_CLIP)
    common = {"n_boot": n_boot, "level": level, "seed": seed}
    table = vertebra_table(oof, fractures, lookalikes)
    constant_v = pd.DataFrame(best[:, 1:], columns=list(VERTEBRAE)).assign(**{UID: oof[UID].to_numpy()})
    constant_v = constant_v.melt(id_vars=[UID], var_name="vertebra", value_name="p_constant")
    table = table.merge(constant_v, on=[UID, "vertebra"], how="left", validate="1:1")

    def three(rows: pd.DataFrame, label: str) -> tuple[dict, dict, dict]:
        return (bootstrap_auc(rows[label], rows["p"], rows[UID], **common),
                bootstrap_auc(rows[label], rows["p"], rows[UID], rows["vertebra"], **common),
                bootstrap_auc(rows[label], rows["p_constant"], rows[UID], **common))

    out = {"n_studies": int(len(oof)), "patient": bootstrap_auc(y[:, 0], p[:, 0], oof[UID].to_numpy(), **common)}
    out["vertebra"], out["vertebra_level"], out["vertebra_constant"] = three(table, "y")
    intact = table["y"] == 0
    if fractures is not None:
        found = {kind: three(table[intact | (table[kind] == 1)], kind) for kind in KINDS}
        for i, suffix in enumerate(("", "_level", "_constant")):
            out[f"by_kind{suffix}"] = {kind: found[kind][i] for kind in KINDS}
    if lookalikes is not None:
        out[LOOKALIKE], out[f"{LOOKALIKE}_level"], _ = three(table[intact], LOOKALIKE)
    model, constant = study_losses(y, p), study_losses(y, best)
    out["score"] = bootstrap_mean(model, **common)
    out["constant"] = bootstrap_mean(constant, **common)
    out["prevalence_constant"] = float(study_losses(y, plain).mean())
    out["score_minus_constant"] = bootstrap_mean(model - constant, **common)
    return out


# ---------------------------------------------------------------------------------------------------------
# The gallery: what the classifier is given
# ---------------------------------------------------------------------------------------------------------


def positive_tiles(crop_dir: PathLike, uids: Sequence[str], boxes: pd.DataFrame, fractures: pd.DataFrame | None,
                   channel: int, n_tiles: int = 24) -> list[dict]:
    """The positive slices to draw: of each fractured vertebra with slice targets, its middle positive slice, the
    fracture boxes of that slice in crop pixels (`kit.evaluate.explain.box_to_crop`), taken kind by kind in turn so that
    every kind shows.

    Args:
        crop_dir: the crop cache.
        uids: its studies to draw from.
        boxes: `train_bounding_boxes.csv` rows.
        fractures: the generator's answers (`kit.synthetic.score.read_answers`), to name each tile's kind.
        channel: the channel drawn (the first window's centre slice: `centre_channel`).
        n_tiles: at most this many.

    Returns:
        Dicts `uid`, `vertebra`, `kind`, `slice` (0..T-1), `n_slices`, `image` (S, S) uint8 (the centre slice of
        the first window), `boxes` (n, 4) x0, y0, x1, y1 in crop pixels.
    """
    from ..stage2.store import load_crops
    from ..evaluate.explain import box_to_crop

    by_kind: dict[str, list[dict]] = {}
    for uid in uids:
        arrays = load_crops(crop_dir, uid)
        if "crop_boxes" not in arrays:
            raise ValueError(f"{crop_dir}/{uid}.npz has no crop_boxes (an old cache); delete it and build it again")
        crops, targets = arrays["crops"], np.nan_to_num(arrays["slice_targets"])
        numbers = arrays.get("slice_numbers", arrays["instance_numbers"])
        study_boxes = boxes[boxes[UID] == uid]
        for i, name in enumerate(VERTEBRAE):
            positive = np.flatnonzero(targets[i] > 0)
            if not len(positive):
                continue
            t = int(positive[len(positive) // 2])
            z = int(arrays["positions"][i, t])
            kind = "fracture"
            if fractures is not None:
                here = fractures[(fractures[UID] == uid) & (fractures["vertebra"] == name)]
                covering = here[(here["z_first"] <= z) & (here["z_last"] >= z)]
                kinds = sorted(set((covering if len(covering) else here)["kind"].astype(str)))
                kind = "+".join(kinds) or "fracture"
            on_slice = study_boxes[study_boxes["slice_number"] == int(numbers[z])]
            mapped = box_to_crop(on_slice[["x", "y", "width", "height"]].to_numpy(), arrays["crop_boxes"][i],
                                 crops.shape[-1]) if len(on_slice) else np.zeros((0, 4))
            by_kind.setdefault(kind, []).append({"uid": uid, "vertebra": name, "kind": kind, "slice": t,
                                                 "n_slices": crops.shape[1], "image": crops[i, t, channel],
                                                 "boxes": mapped})
    tiles, order = [], sorted(by_kind, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))
    while len(tiles) < n_tiles and any(by_kind[k] for k in order):
        for kind in order:
            if by_kind[kind] and len(tiles) < n_tiles:
                tiles.append(by_kind[kind].pop(0))
    return tiles


def centre_channel(cfg) -> int:
    """The channel of a classifier config's crops that holds the sampled slice itself in its first window."""

    d = cfg.data
    return cfg.recipe().channel_names.index(f"{d.windows[0]}+0")


def plot_positive_gallery(tiles: list[dict], title: str, columns: int = 8):
    """The tiles at the pixels the model gets (nearest neighbour), each with its fracture boxes in red.

    Returns:
        A matplotlib Figure (not attached to pyplot: save it with `savefig`).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = max(1, -(-len(tiles) // columns))
    fig = Figure(figsize=(1.9 * columns, 2.1 * rows + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not tiles:
        axes[0, 0].text(0, 0.5, "no slice with a fracture target in this crop cache", fontsize=10)
    for ax, tile in zip(axes.ravel(), tiles):
        size = tile["image"].shape[-1]
        ax.imshow(tile["image"], cmap="gray", vmin=0, vmax=255, interpolation="nearest",
                  extent=(0, size, size, 0))
        for x0, y0, x1, y1 in tile["boxes"]:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=0.8))
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        ax.set_title(f"{tile['vertebra']} {tile['kind']}\n…{tile['uid'][-5:]} slice {tile['slice'] + 1}/"
                     f"{tile['n_slices']}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Data, crops and runs, each made once
# ---------------------------------------------------------------------------------------------------------


def ensure_dataset(out: Path, grid: int, n_train: int, seed: int, n_slices: int | None,
                   bbox_share: float) -> dict:
    """The bench's synthetic set of (grid, seed, studies), made on first use: `data/` and `answers/` under
    `<out>/sets/<key>/`. Returns its paths and the minutes it took to make (read back from its summary)."""
    from ..synthetic import make_dataset

    key = f"g{grid}_s{seed}_n{n_train}" + (f"_z{n_slices}" if n_slices else "") + \
        (f"_b{bbox_share:g}" if bbox_share != 0.5 else "")
    folder = out / "sets" / key
    data, answers = folder / "data", folder / "answers"
    if not (answers / "summary.json").is_file():
        log.info("making the synthetic set %s (%d studies at %d px)", key, n_train, grid)
        make_dataset(data, n_train=n_train, n_test=0, size=grid, seed=seed, seg_share=1.0, bbox_share=bbox_share,
                     n_slices=n_slices, answers_dir=answers, workers=1, progress=False)
    made = json.loads((answers / "summary.json").read_text())
    return {"key": key, "data": data, "answers": answers, "minutes": made["seconds"] / 60.0}


def _paths_overrides(data: Path, crop_dir: Path, folds_csv: Path, n_folds: int, crop: int) -> dict:
    return {"data.data_root": str(data), "data.crop_dir": str(crop_dir), "data.folds_csv": str(folds_csv),
            "data.n_folds": n_folds, "data.seg_runs": [], "data.true_masks": True, "data.image_size": crop}


def ensure_crops(dataset: dict, crop: int, folds_csv: Path, n_folds: int) -> dict:
    """The set's crop cache at `crop` px (`<set>/crops<crop>/`, from the truth), built on first use (in this
    process, no read-ahead worker). Returns its folder and the minutes the build took (its manifest's seconds)."""
    from ..config import load_config
    from ..stage2.crop_cache import MANIFEST, build_crops

    crop_dir = dataset["data"].parent / f"crops{crop}"
    cfg = load_config(BASE_CONFIG, **_paths_overrides(dataset["data"], crop_dir, folds_csv, n_folds, crop))
    result = build_crops(cfg, split="train", progress=False, prefetch=False)
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} studies of {dataset['data']} could not be cropped: "
                           f"{list(result['failures'].items())[:3]}; see {crop_dir / 'failures.csv'}")
    manifest = pd.read_csv(crop_dir / MANIFEST)
    return {"crop_dir": crop_dir, "minutes": float(manifest["seconds"].sum()) / 60.0}


def training_view(crop_dir: Path, folds: pd.DataFrame, fold: int, share: float, seed: int, views: Path) -> Path:
    """A crop folder holding every held-out study of `fold` and a seeded `share` of its training studies: a
    manifest of those rows and links to their files (the crops themselves stay where they are)."""
    if share >= 1.0:
        return crop_dir
    from ..stage2.crop_cache import MANIFEST

    manifest = pd.read_csv(crop_dir / MANIFEST, dtype={UID: str})
    fold_of = dict(zip(folds[UID], folds["fold"].astype(int)))
    train = sorted(u for u in manifest[UID] if fold_of[u] != fold)
    keep = set(np.random.default_rng(seed).permutation(train)[:max(1, int(round(share * len(train))))].tolist())
    keep |= {u for u in manifest[UID] if fold_of[u] == fold}
    view = views / f"{crop_dir.parent.name}_{crop_dir.name}_fold{fold}_share{share:g}_seed{seed}"
    view.mkdir(parents=True, exist_ok=True)
    for uid in keep:
        link = view / f"{uid}.npz"
        if not link.exists():
            try:
                link.symlink_to((crop_dir / f"{uid}.npz").resolve())
            except OSError:  # no symbolic links here: a hard link, else a copy
                try:
                    os.link(crop_dir / f"{uid}.npz", link)
                except OSError:
                    import shutil

                    shutil.copyfile(crop_dir / f"{uid}.npz", link)
    manifest[manifest[UID].isin(keep)].to_csv(view / MANIFEST, index=False)
    return view


def run_overrides(setting: Setting, paths: dict, epochs: int, fold: int, name: str, runs: Path) -> dict:
    """`load_config(demo_cls, **these)` for one fold of a setting: its paths, crop size, backbone, epochs
    (validated once, after the last), flip TTA or not, one torch thread, no progress bar."""
    return {**paths, "name": name, "out_dir": str(runs), "data.fold": fold, "model.encoder": setting.encoder,
            "model.pretrained_weights": setting.pretrained, "train.epochs": epochs, "train.val_every": epochs,
            "train.threads": 1, "train.progress": False, "model.freeze_backbone": setting.freeze,
            "data.tta_flip": setting.tta_flip, **({"optim.lr": setting.lr} if setting.lr else {})}


def _run_name(setting_name: str, setting: Setting, key: str, epochs: int, n_folds: int, seed: int) -> str:
    """`<setting>-<hash>`: the hash of everything that makes the run (not the setting's description), so a run is
    reused only for the same thing."""
    later = {"freeze": False, "lr": None, "tta_flip": False}  # added later: at these, the hash is as it was
    fields = {k: v for k, v in asdict(setting).items() if k != "what" and not (k in later and v == later[k])}
    from ..models.start import is_start, start_meta

    if is_start(setting.pretrained):  # a remade starting checkpoint makes new runs
        fields["start_sha256"] = start_meta(setting.pretrained)["sha256"]
    what = json.dumps([fields, key, epochs, n_folds, seed], sort_keys=True)
    return f"{setting_name}-{hashlib.sha1(what.encode()).hexdigest()[:8]}"


def _train_labels(data: Path, folds: pd.DataFrame, view: Path, fold: int) -> np.ndarray:
    """(n, 8) labels of the studies fold `fold`'s model trained on (its view's studies outside the fold)."""
    from ..stage2.data import crop_uids
    from ..io.rsna import load_train

    fold_of = dict(zip(folds[UID], folds["fold"].astype(int)))
    uids = [u for u in crop_uids(view) if fold_of[u] != fold]
    table = load_train(data).set_index(UID)
    return table.loc[uids, list(TARGETS)].to_numpy(np.float64)


# ---------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------


def resolve_settings(names: Sequence[str] | None, quick: bool) -> dict[str, Setting]:
    """The chosen settings by name (default `DEFAULT_SETTINGS`; quick: base and lite0), each at the quick run's
    grid and crop size with `quick` (a setting that starts from a shipped checkpoint keeps its crop size).

    Raises:
        ValueError: an unknown name (the valid ones are listed).
    """
    names = list(names or (("base", "lite0") if quick else DEFAULT_SETTINGS))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; available: {', '.join(SETTINGS)}")
    chosen = {n: SETTINGS[n] for n in names}
    if quick:
        from dataclasses import replace

        from ..models.start import is_start

        # a shipped starting checkpoint takes the crops it was trained on
        chosen = {n: replace(s, grid=QUICK["grid"], crop=s.crop if is_start(s.pretrained) else QUICK["crop"])
                  for n, s in chosen.items()}
    return chosen


def bench_learn(out: PathLike = "bench_learn", settings: Sequence[str] | None = None, *, n_train: int | None = None,
                folds: Sequence[int] | None = None, n_folds: int | None = None, epochs: int | None = None,
                seed: int = SEED, bbox_share: float = 0.5, n_boot: int | None = None, quick: bool = False,
                print_table: bool = True) -> dict:
    """Train and score the classifier under each setting; returns what `<out>/bench_learn.json` holds.

    Args:
        out: the output folder (sets, crops, runs, galleries, the JSON).
        settings: names of `SETTINGS` (default `DEFAULT_SETTINGS`).
        n_train: studies of each synthetic set (default `N_TRAIN`; quick 12).
        folds: folds trained and scored (default `FOLDS`).
        n_folds: folds of the split (default `N_FOLDS`): each fold holds out n_train / n_folds studies.
        epochs: the bench's epochs (default `EPOCHS`; a setting scales them by its `epoch_scale`).
        seed: the synthetic sets' seed (never the demo's 0); also the seed of the training subsets and draws.
        bbox_share: share of the fractured studies with fracture boxes, hence slice targets (the demo's 0.5).
        n_boot: bootstrap draws (default `N_BOOT`).
        quick: the smoke run of `QUICK` (seconds): 64 px grid, 32 px crops, 12 studies, one fold, one epoch.
        print_table: print the table when done.

    Returns:
        {"parameters", "environment", "rows": [one dict per setting], "table": the printed table's text}.
    """
    from ..config import load_config
    from .demo import environment
    from ..synthetic.score import read_answers
    from ..io.rsna import load_boxes
    from ..io.folds import folds_for
    from ..train import fit_fold

    q = QUICK if quick else {}
    n_train = n_train or q.get("n_train", N_TRAIN)
    folds = tuple(int(k) for k in (folds if folds is not None else q.get("folds", FOLDS)))
    n_folds = n_folds or q.get("n_folds", N_FOLDS)
    epochs = epochs or q.get("epochs", EPOCHS)
    n_boot = n_boot or q.get("n_boot", N_BOOT)
    n_slices = q.get("n_slices")
    if seed == 0:
        raise ValueError("seed 0 makes the demo's studies; the bench must not score (or tune) on them: pick another")
    bad = [k for k in folds if not 0 <= k < n_folds]
    if bad or not folds:
        raise ValueError(f"folds {list(folds)} must be non-empty and in 0..{n_folds - 1} (n_folds={n_folds})")
    chosen = resolve_settings(settings, quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    galleries = out / "galleries"
    galleries.mkdir(exist_ok=True)
    folds_csv = out / "sets" / f"folds_s{seed}_n{n_train}_k{n_folds}.csv"
    folds_csv.parent.mkdir(parents=True, exist_ok=True)
    parameters = {"settings": list(chosen), "n_train": n_train, "folds": list(folds), "n_folds": n_folds,
                  "epochs": epochs, "seed": seed, "bbox_share": bbox_share, "n_boot": n_boot, "level": LEVEL,
                  "quick": quick, "base_config": BASE_CONFIG, "folds_csv": str(folds_csv)}
    result = {"parameters": parameters, "environment": environment(),
              "settings": {n: asdict(s) for n, s in chosen.items()}, "rows": []}
    json_path = out / "bench_learn.json"
    for name, setting in chosen.items():
        log.info("bench learn: %s (%s)", name, setting.describe())
        dataset = ensure_dataset(out, setting.grid, n_train, seed, n_slices, bbox_share)
        table = folds_for(dataset["data"], path=folds_csv, n_folds=n_folds)
        crops = ensure_crops(dataset, setting.crop, folds_csv, n_folds)
        answers = read_answers(dataset["answers"])
        lookalikes = pd.read_csv(dataset["answers"] / "lookalikes.csv", dtype={UID: str})
        boxes = load_boxes(dataset["data"])
        run_epochs = max(1, int(round(epochs * setting.epoch_scale)))
        run_name = _run_name(name, setting, dataset["key"], run_epochs, n_folds, seed)
        oofs, train_labels, n_train_studies, train_minutes = [], {}, [], 0.0
        for k in folds:
            view = training_view(crops["crop_dir"], table, k, setting.train_share, seed, out / "views")
            paths = _paths_overrides(dataset["data"], view, folds_csv, n_folds, setting.crop)
            cfg = load_config(BASE_CONFIG, **run_overrides(setting, paths, run_epochs, k, run_name, out / "runs"))
            fit_fold(cfg)
            run_log = pd.read_csv(cfg.run_dir / "log.csv")
            train_minutes += float(run_log["seconds"].sum()) / 60.0
            oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str})
            oofs.append(oof.assign(fold=k))
            train_labels[k] = _train_labels(dataset["data"], table, view, k)
            n_train_studies.append(len(train_labels[k]))
        oof = pd.concat(oofs, ignore_index=True)
        figures = score_heldout(oof, train_labels, fractures=answers, lookalikes=lookalikes, n_boot=n_boot,
                                seed=seed)
        tiles = positive_tiles(crops["crop_dir"], sorted(table[UID]), boxes, answers, centre_channel(cfg))
        gallery = galleries / f"{name}.png"
        fig = plot_positive_gallery(tiles, f"{name}: {setting.describe()} - positive slices (target 1) as the "
                                           f"classifier gets them ({setting.crop} px, bone window, centre channel), "
                                           "fracture boxes in red")
        fig.savefig(gallery, dpi=110)
        row = {"setting": name, "what": setting.what, "describe": setting.describe(), **asdict(setting),
               "epochs": run_epochs, "train_studies": n_train_studies, "heldout_studies": int(len(oof)),
               "run_dir": str(out / "runs" / run_name), "set": dataset["key"], "crop_dir": str(crops["crop_dir"]),
               "gallery": str(gallery), "gallery_tiles": len(tiles),
               "minutes": {"data": round(dataset["minutes"], 2), "crops": round(crops["minutes"], 2),
                           "training": round(train_minutes, 2)},
               **figures}
        result["rows"].append(row)
        json_path.write_text(json.dumps(jsonable(result), indent=2))  # what is done survives a kill
    result["table"] = format_table(result["rows"])
    json_path.write_text(json.dumps(jsonable(result), indent=2))
    if print_table:
        print(result["table"])
        print(f"\nall figures: {json_path}; galleries: {galleries}")
    return result


def _ci(d: dict | None, key: str = "auc") -> str:
    if not d or d.get(key) is None:
        return "–"
    if d.get("lo") is None:
        return f"{d[key]:.2f}"
    return f"{d[key]:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def format_table(rows: list[dict]) -> str:
    """The printed table: setting, train / held-out studies, patient AUC, vertebra AUC pooled (with the constant's)
    and within levels, each [90 % CI], AUC by kind within levels (hairline / cleft / displaced / compression), score
    vs the constant (difference [CI]), minutes."""
    header = ["setting", "grid/crop backbone", "ep", "train", "held", "patient AUC [90% CI]",
              "vertebra AUC [90% CI] (const)", "within level [90% CI]", "by kind h/c/d/comp",
              "score vs const (diff [CI])", "min data/crops/train"]
    lines = []
    for r in rows:
        by_kind = r.get("by_kind_level") or {}
        kinds = "/".join("–" if (by_kind.get(k) or {}).get("auc") is None else f"{by_kind[k]['auc']:.2f}"
                         for k in KINDS)
        diff = r["score_minus_constant"]
        score = (f"{r['score']['mean']:.4f} vs {r['constant']['mean']:.4f} ({diff['mean']:+.4f} "
                 f"[{diff['lo']:+.4f}, {diff['hi']:+.4f}])")
        m = r["minutes"]
        lines.append([r["setting"], r["describe"], str(r["epochs"]), "+".join(map(str, r["train_studies"])),
                      str(r["heldout_studies"]), _ci(r["patient"]),
                      f"{_ci(r['vertebra'])} ({_ci({'auc': r['vertebra_constant']['auc']})})",
                      _ci(r["vertebra_level"]), kinds, score, f"{m['data']:.1f}/{m['crops']:.1f}/{m['training']:.1f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*ln) for ln in lines)])
