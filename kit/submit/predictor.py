"""The submission predictor: trained runs -> `predict_study` per study -> `kit.submit.submission`'s writer.

- `load_runs(paths, device)`: RUN folders as `kit submit --runs` takes them: `runs/<config name>` (all its
  trained folds), one `runs/<config name>/fold<k>` folder, or the runs of a `kit export` folder (`export/*`:
  its `manifest.json` is skipped, every file loaded is checked against its SHA-256 first). Each run's stage
  (segmenter, level model, classifier) comes from its saved config, never from the command line.
- `StudyPredictor`: the writer's `Predictor` (`predict(uid, series) -> Prediction(8 probabilities, notes)`: a
  vertebra not found valued as validation values it, and named in the log) over loaded runs.
- `PredictorFactory`: a picklable `device -> StudyPredictor`, so `write_submission_parallel` can build one
  predictor per device in its spawned workers (`--devices cuda:0 cuda:1` on Kaggle's T4 x 2).
- `submit(data_root, runs, out, ...)`: the whole `kit submit`, for the notebook too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runs import InferenceOptions, flatten_models
from ..constants import CLASSIFIER, LEVELS, SEGMENTER
from ..stages import stage_of
from ..stage1.infer import segment_study
from ..stage1.postprocess import THRESHOLD
from ..stage2.infer import classify_study
from .export import is_manifest, resolve_run, verify_run
from ..paths import PathLike

log = logging.getLogger("kit.submit.predictor")


def resolve_runs(paths: Sequence[PathLike]) -> list[tuple[Path, list[int]]]:
    """RUN arguments -> [(run folder, folds)], manifests skipped, exported runs checked against their checksums.

    Raises:
        FileNotFoundError: a RUN is neither a run folder nor a fold folder, or no RUN is left.
        kit.submit.export.ChecksumError: an exported file is missing or differs from its manifest's SHA-256.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    resolved: dict[Path, list[int]] = {}
    for path in paths:
        if is_manifest(path):
            continue
        run_dir, folds = resolve_run(path)
        verify_run(run_dir, folds)
        known = resolved.setdefault(run_dir, [])
        known.extend(k for k in folds if k not in known)
    if not resolved:
        raise FileNotFoundError(f"no run among {[str(p) for p in paths]}")
    return [(run_dir, sorted(folds)) for run_dir, folds in resolved.items()]


def load_runs(paths: Sequence[PathLike], device: str = "cpu") -> list[list]:
    """Load RUN folders (`resolve_runs`) with `kit.runs.load_run`: one list of fold models per run.

    Raises:
        FileNotFoundError, kit.submit.export.ChecksumError: as `resolve_runs`.
        RuntimeError: a checkpoint cannot be rebuilt (`load_run`).
    """
    from ..runs import load_run

    return [load_run(run_dir, folds=folds, device=device) for run_dir, folds in resolve_runs(paths)]


def _stages(runs: list[list]) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    for run in runs:
        stages.setdefault(run[0].provides, []).append(f"{Path(run[0].path).parent.parent.name} (folds "
                                                      f"{', '.join(str(m.fold) for m in run)})")
    return stages


@dataclass
class StudyPredictor:
    """The writer's predictor: `predictor(uid, series)` -> `kit.submit.submission.Prediction`: (8,) probabilities in
    TARGETS order and a log note naming the vertebrae stage 1 did not find. Arguments as
    `kit.submit.predictor.predict_study`."""

    runs: list
    options: InferenceOptions | None = None
    device: str | None = None

    def __call__(self, uid: str, study):
        from .predictor import predict_study
        from .submission import Prediction

        result = predict_study(study, self.runs, self.options, device=self.device, uid=uid)
        notes = ()
        if result["missing"]:  # valued as in validation (kit.evaluate.metrics.fill_missing_vertebrae); the log says so
            notes = (("vertebrae not found", "; ".join(f"{name}: {why}" for name, why in result["missing"].items())
                      + " (each valued at its training prevalence, as in validation)"),)
        return Prediction(result["probs"], notes)


@dataclass(frozen=True)
class PredictorFactory:
    """Picklable `device -> StudyPredictor`: loads the runs on that device (in a spawned worker, once).

    Attributes:
        runs: RUN folders (`resolve_runs`).
        options: as `kit.submit.predictor.predict_study`.
        threads: torch CPU threads in the process that builds the predictor (None: torch's default); several
            CPU workers on one machine should share the cores.
    """

    runs: tuple[str, ...]
    options: InferenceOptions | None = None
    threads: int | None = None

    def __call__(self, device: str) -> StudyPredictor:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        if torch.device(device).type == "cuda" and torch.device(device).index is not None:
            # this worker's own GPU as its current device, so that nothing (cuDNN handles, the allocator's
            # default) opens a second CUDA context on cuda:0 beside the other worker's
            torch.cuda.set_device(torch.device(device))
        runs = load_runs(self.runs, device=device)
        log.info("predictor on %s: %s", device, _stages(runs))
        return StudyPredictor(runs, self.options, device=device)


def default_devices() -> list[str]:
    """Every visible GPU (`cuda:0`, `cuda:1`, ...; Kaggle's T4 x 2 -> two workers), else `["cpu"]`."""
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def _check_stages(paths: Sequence[PathLike]) -> None:
    """Fail early, before any worker starts, when the runs cannot make a submission (no classifier or no
    segmenter, or a broken `calibration.json`), reading each run's config and calibration only."""
    import yaml

    from ..config import config_from_dict
    from ..evaluate.calibration import read_calibration

    provides = set()
    for run_dir, folds in resolve_runs(paths):
        with open(run_dir / f"fold{folds[0]}" / "config.yaml") as f:
            provides.add(stage_of(config_from_dict(yaml.safe_load(f))).gives)
        read_calibration(run_dir)  # raises, naming the file, rather than failing every study later
    lacking = [name for role, name in ((SEGMENTER, "a segmenter run"), (CLASSIFIER, "a classifier run"))
               if role not in provides]
    if lacking:
        raise ValueError(f"--runs {[str(p) for p in paths]} lack {' and '.join(lacking)}: a submission needs "
                         "stage 1 (segmenter, optionally level model) and stage 2 (classifier)")


def run_fallback(paths: Sequence[PathLike]) -> np.ndarray | None:
    """(8,) the writer's fallback from the classifier runs among `paths`: the constant that minimises the scored
    (row-normalised) metric on their training labels, `kit.evaluate.metrics.best_constant(train_prevalence, metric_odds)`
    of each fold checkpoint (what the model carries, `ClsTask.init_model`), averaged over them. None when no
    classifier checkpoint carries its training prevalence (saved by an older kit): the writer then uses the 2019
    table (`kit.submit.submission.FALLBACK`).

    Raises:
        FileNotFoundError, kit.submit.export.ChecksumError: as `resolve_runs`.
    """
    import torch
    import yaml

    from ..config import config_from_dict
    from ..evaluate.metrics import best_constant

    constants = []
    for run_dir, folds in resolve_runs(paths):
        for fold in folds:
            with open(run_dir / f"fold{fold}" / "config.yaml") as f:
                if stage_of(config_from_dict(yaml.safe_load(f))).gives != CLASSIFIER:
                    break
            state = torch.load(run_dir / f"fold{fold}" / "model.pt", map_location="cpu", weights_only=True)["model"]
            for prefix in ("", "vertebra."):
                if f"{prefix}train_prevalence" in state and f"{prefix}metric_odds" in state:
                    constants.append(best_constant(state[f"{prefix}train_prevalence"].double().numpy(),
                                                   state[f"{prefix}metric_odds"].double().numpy()))
                    break
    return np.mean(constants, axis=0) if constants else None


def submit(data_root: PathLike, runs: Sequence[PathLike], out: PathLike = "submissions/submission.csv", *,
           options: InferenceOptions | None = None, time_budget: float | None = None,
           devices: Sequence[str] | None = None, prefetch: bool = True, progress: bool = True,
           threads: int | None = None) -> dict:
    """Predict the test studies of `data_root` with `runs` and write a complete, validated submission.

    Studies come from `kit.io.rsna.studies_to_predict(data_root)`, rows and their order from
    `<data_root>/sample_submission.csv` when it exists; each study is read once (`DicomStudyReader` in a
    prefetch process) and predicted by `StudyPredictor`; every failure gets fallbacks and a line in
    `<out stem>_log.csv` (`kit.submit.submission`).

    Args:
        data_root: the competition folder (`test_images/`, `test.csv`, `sample_submission.csv`), e.g.
            `/kaggle/input/rsna-2022-cervical-spine-fracture-detection`.
        runs: RUN folders (`load_runs`): segmenter (+ level model) and classifier runs, or an export's `*`.
        out: the submission CSV.
        time_budget: seconds from the call (model loading included) to a deadline: past the projected end, the
            remaining studies get fallbacks, and a study still read or predicted at the deadline is cut off (its
            worker processes stopped) so that the files are written on time (`kit.submit.submission`).
        devices: one worker per entry (`["cuda:0", "cuda:1"]`); default `default_devices()`.
        options: classifier mean, run weights, flip TTA, autocast (`kit.runs.InferenceOptions`).
        prefetch: read the next study in a separate process while this one is predicted (off: in this process,
            where a native decoder crashing on a corrupt file would end the run; on, that study gets fallbacks).
        progress: progress bar and the writer's one-line summary.
        threads: torch threads per worker; default: the CPU cores shared among the CPU workers.

    Returns:
        The writer's summary (`studies`, `predicted`, `fallback_studies`, `fallbacks`, `seconds`, paths,
        `devices`).
    """
    from ..io.rsna import studies_to_predict
    from .parallel import write_submission_parallel

    root = Path(data_root)
    paths = tuple(str(p) for p in ([runs] if isinstance(runs, (str, os.PathLike)) else runs))
    _check_stages(paths)
    devices = list(devices) if devices else default_devices()
    cpu_workers = sum(str(d).startswith("cpu") for d in devices)
    if threads is None and cpu_workers > 1:
        threads = max(1, (os.cpu_count() or 1) // cpu_workers)
    factory = PredictorFactory(paths, options, threads=threads)
    uids, _ = studies_to_predict(root)
    sample = root / "sample_submission.csv"
    return write_submission_parallel(uids, factory, devices, out, sample_submission=sample if sample.is_file()
                                     else None, images_dir=root / "test_images", time_budget=time_budget,
                                     prefetch=prefetch, progress=progress, fallback=run_fallback(paths))


def predict_study(study, runs, options: InferenceOptions | None = None, *, device: str | torch.device | None = None,
                  seg=None, threshold: float = THRESHOLD, batch_size: int | None = None,
                  uid: str | None = None) -> dict:
    """One study, DICOM in, the competition's 8 probabilities out.

    One DICOM read (`kit.io.dicom.read_series`, or the `Series` given) serves both stages: stage 1's input is
    `kit.io.cache.prepare_arrays(series, size, window)` at the segmenters' size and window (what `kit prepare`
    caches for training), segmented by the stage-1 runs (`segment_study`: segmenters, level models fused in);
    stage 2 crops the full-resolution `series.hu` (`classify_study`).

    A vertebra not found is worth its training prevalence, in its own value and in patient_overall, exactly as
    in validation (`kit.evaluate.metrics.fill_missing_vertebrae`). patient_overall comes from the patient head of a
    classifier that has one (`cls_patient_gru`), else from the vertebrae (`kit.evaluate.metrics.targets_from_vertebrae`).

    Args:
        study: a study folder of DICOM files, or a `kit.io.dicom.Series` already read.
        runs: `load_run` outputs (stage 1 and stage 2 together, nested lists allowed) or run folders; each
            model's role is its stage's (`LoadedModel.provides`, `kit.stages`): SEGMENTER, LEVELS (level model),
            CLASSIFIER. Any number of folds and runs per stage.
        options: how the models run and the classifier ensemble is averaged (`kit.runs.InferenceOptions`: mean,
            run weights, flip TTA, autocast; default: its defaults). Stage 1 averages probabilities
            (`segment_study`) and takes only the autocast.
        device: where the models run (default: where they are).
        seg: a stage-1 result to use instead of running the stage-1 models (e.g. from the ground truth).
        threshold: stage 1's clean-up threshold.
        batch_size: stage-1 slices per forward pass (default `stage1_batch_size`).
        uid: study name (default: the series').

    Returns:
        `uid`; `probs` float64 (8,) in TARGETS order; `found` bool (7,);
        `missing` {name: why}; `patient_source`; `models` and `runs` (per-model and per-run probabilities);
        `seg` (the `SegResult`); `timing` seconds (`read_s`, `segment_s`, `crop_s`, `classify_s`, `total_s`).

    Raises:
        ValueError: no classifier, or no segmenter and no `seg`; `options.weights` that do not fit the runs.
        SegmentationError, ClassificationError: a model produced NaN.
        kit.io.dicom.DicomError: the folder cannot be read.
    """
    from ..io.cache import prepare_arrays
    from ..io.dicom import read_series

    start = time.perf_counter()
    options = options or InferenceOptions()
    series = study if hasattr(study, "hu") else read_series(study)
    uid = uid or getattr(series, "uid", None)
    t_read = time.perf_counter()
    models = flatten_models(runs)
    unknown = sorted({m.provides for m in models} - {SEGMENTER, LEVELS, CLASSIFIER})
    if unknown:
        raise ValueError(f"models that provide {unknown}: predict_study uses segmenters ({SEGMENTER}), level "
                         f"models ({LEVELS}) and classifiers ({CLASSIFIER})")
    stage1 = [m for m in models if m.provides in (SEGMENTER, LEVELS)]
    classifiers = [m for m in models if m.provides == CLASSIFIER]
    if not classifiers:
        raise ValueError("no classifier run among the runs given (a run whose config provides 'fractures')")
    if seg is None:
        segmenters = [m for m in stage1 if m.provides == SEGMENTER]
        if not segmenters:
            raise ValueError("no segmenter run among the runs given, and no seg= result to use instead")
        prepared = prepare_arrays(series, segmenters[0].image_size, segmenters[0].window)
        seg = segment_study({**prepared, "uid": uid}, stage1, batch_size=batch_size, device=device, amp=options.amp,
                            threshold=threshold, uid=uid)
    t_seg = time.perf_counter()
    result = classify_study(series.hu, seg, classifiers, dz=float(series.spacing[0]), options=options, device=device,
                            uid=uid)
    timing = {"read_s": round(t_read - start, 4), "segment_s": round(t_seg - t_read, 4), **result.pop("timing"),
              "total_s": round(time.perf_counter() - start, 4)}
    return {"uid": uid, **result, "seg": seg, "timing": timing}
