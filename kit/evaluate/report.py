"""Reports of trained runs: out-of-fold (OOF) tables, plots and the worst studies, for every kind of run.

`run_report(run_dirs)` (what `kit report` calls) picks each run's report by the `task` of its
`fold*/config.yaml` (by its `oof.csv` columns when there is no config); a kind is a `ReportKind` that its stage's
entry in `kit.stages.STAGES` names:

- `seg` -> `seg_report` (`kit.evaluate.stage1`, as `level_report`): 3D Dice and z-range errors per vertebra and fold, training curves, the worst studies
  with a sagittal picture each. `fold<k>/oof.csv`: `StudyInstanceUID, fold, epoch, slices, dice_C1..dice_C7,
  dice_mean, zerr_C1..zerr_C7, zerr_max` (z-range error in slices; a missed vertebra counts as the study's
  slice count; NaN = absent from the truth).
- `level` -> `level_report`: IoU per vertebra and fold, curves, the worst studies. `fold<k>/oof.csv`:
  `StudyInstanceUID, fold, epoch, steps, iou_C1..iou_C7, iou_mean`.
- `cls` (classifier format) -> `oof_report`: competition score next to the prevalence baseline, per-target
  contributions and AUCs, per-fold scores, ROC / calibration / histogram plots, blends of several runs.
  `fold<k>/oof.csv` (or one `oof.csv` at the run root): `StudyInstanceUID`, `fold`, the 8 predicted
  probabilities named exactly as TARGETS (`patient_overall, C1..C7`) and the 8 labels as `<target>_true`.
  Optional: `fold<k>/oof_summary.json` with `train_prevalence` (the training folds' prevalence of each target,
  written by `kit.tasks.ClsTask`) for the baseline from the training folds; on synthetic data, the generator's
  answers (`<answers_dir>/fractures.csv`) for the recall by fracture kind and subtlety and the score a perfect
  detector of the plainest kinds would reach (`score_ceilings`).

Each report writes `report.md`, `report.json` and PNGs (by default in the run folder) and returns what it wrote
and its numbers. Every fold folder also holds `log.csv` (epoch, train_loss, val_loss, val_<metric>, lr,
seconds), read for the training curves. Plots are drawn on `matplotlib.figure.Figure` objects with the Agg
canvas, never through pyplot, so they work headless and do not touch a notebook's backend (in a notebook,
show one by leaving it as a cell's last value).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..constants import TARGETS
from ..synthetic.score import (
    ANSWERS_NAME,
    RECALL_THRESHOLD,
    fracture_recall,
    lookalike_false_alarms,
    read_answers,
    score_ceilings,
)
from .markdown import file_slug, fmt, jsonable, md_table
from .metrics import (
    competition_score,
    prevalence_baseline,
)
from .oof import (
    FITTED_BLEND,
    MEAN_BLEND,
    OOF_NAME,
    TRUE_COLUMNS,
    _model_summary,
    fit_blend_weights,
    fold_dirs,
    load_oof,
    studies_without_oof,
    train_fold_baseline,
    train_fold_prevalence,
)
from .plots import _save, plot_calibration, plot_histograms, plot_roc
from .stage1 import LEVEL_COLUMNS, SEG_COLUMNS
from .stage1_report import level_report, seg_report
from ..paths import PathLike

log = logging.getLogger("kit.evaluate.report")

UID = "StudyInstanceUID"


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _markdown(result: dict, slug: dict) -> str:
    models = result["models"]
    base = result["baseline"]
    lines = [f"# OOF report: {', '.join(result['runs'])}", ""]
    fair = result.get("baseline_from_train_folds")
    lines += [f"{base['n_studies']} studies with out-of-fold predictions in all runs. Competition metric: weighted "
              "multi-label log loss, lower is better. **row** = per-study normalised (public reference form), "
              "**global** = total weighted loss / total weight. Two prevalence baselines predict the same "
              "constants for every study: **training folds** = each fold's studies get the prevalence of the "
              "studies its model trained on (what a model could have known; the gains are against it), "
              "**in-sample** = the OOF's own prevalence (peeks at the held-out labels, so it is a little "
              "optimistic).", ""]
    for name, info in (result.get("studies_without_oof") or {}).items():
        if info and info["missing"]:
            shown = ", ".join(info["missing"][:10]) + (" ..." if len(info["missing"]) > 10 else "")
            lines += [f"**{len(info['missing'])} of the {info['n_expected']} studies of {name}'s trained folds "
                      f"(`{info['folds_csv']}`) have no out-of-fold prediction** and are not scored: {shown}. "
                      "Their folder, reading, stage 1 or crops failed: see the crop cache's `failures.csv`.", ""]
        elif info:
            lines += [f"Every one of the {info['n_expected']} studies of {name}'s trained folds "
                      f"(`{info['folds_csv']}`) has an out-of-fold prediction.", ""]
    if fair is None:
        lines += ["The training folds' prevalence is unknown for some fold (no `oof_summary.json` with "
                  "`train_prevalence`, and no other fold in the OOF): gains are against the in-sample "
                  "baseline.", ""]
    else:
        sources = sorted(set(fair["sources"].values()))
        lines += [f"Training-fold prevalence from: {'; '.join(sources)}.", ""]
    lines += ["## Summary", ""]
    best = min(m["score_row"] for m in models.values())
    reference = fair if fair is not None else base
    rows = []
    if fair is not None:
        rows.append(["prevalence baseline (training folds)", str(fair["n_studies"]), fmt(fair["score_row"]),
                     fmt(fair["score_global"]), "–", "0.500", "0.500"])
    rows.append(["prevalence baseline (in-sample)", str(base["n_studies"]), fmt(base["score_row"]),
                 fmt(base["score_global"]), "–", "0.500", "0.500"])
    for name, m in models.items():
        gain = reference["score_row"] - m["score_row"]
        score = fmt(m["score_row"])
        rows.append([name, str(m["n_studies"]), f"**{score}**" if m["score_row"] == best else score,
                     fmt(m["score_global"]), f"{gain:+.4f}", fmt(m["auc"]["patient_overall"], 3), fmt(m["mean_auc"], 3)])
    lines += [md_table(["model", "studies", "score (row)", "score (global)", "gain vs baseline (row)",
                      "AUC patient", "mean AUC"], rows), ""]
    if result.get("blend_weights"):
        w = result["blend_weights"]
        lines += ["Blends average the runs' probabilities. The *fitted blend*'s weights "
                  f"({', '.join(f'{r} {v:.3f}' for r, v in w.items())}) were chosen on these same OOF predictions "
                  "to minimise the row score, so its score is **optimistic**; judge it on a held-out set.", ""]

    names = list(models)
    lines += ["## Per target", "", "### Contribution to the row score", "",
              "Each column sums to the model's score: where the loss comes from.", ""]
    fair_part = (lambda t: [fmt(fair["per_target_row"][t])]) if fair is not None else (lambda t: [])
    rows = [[t, fmt(base["prevalence"][t], 3), *fair_part(t), fmt(base["per_target_row"][t])]
            + [fmt(models[n]["per_target_row"][t]) for n in names] for t in TARGETS]
    rows.append(["**total**", "", *([f"**{fmt(fair['score_row'])}**"] if fair is not None else []),
                 f"**{fmt(base['score_row'])}**"] + [f"**{fmt(models[n]['score_row'])}**" for n in names])
    lines += [md_table(["target", "prevalence", *(["baseline (training folds)"] if fair is not None else []),
                      "baseline (in-sample)", *names], rows), ""]
    lines += ["### ROC AUC and mean prediction", "",
              "AUC per target (– where a target has one class); in brackets the mean predicted probability, "
              "to compare with the prevalence.", ""]
    rows = [[t, str(int(round(base["prevalence"][t] * base["n_studies"]))), fmt(base["prevalence"][t], 3)]
            + [f"{fmt(models[n]['auc'][t], 3)} ({fmt(models[n]['mean_pred'][t], 3)})" for n in names] for t in TARGETS]
    rows.append(["**mean AUC**", "", ""] + [f"**{fmt(models[n]['mean_auc'], 3)}**" for n in names])
    lines += [md_table(["target", "positives", "prevalence", *names], rows), ""]

    lines += ["## Per fold", ""]
    folds = sorted({f["fold"] for m in models.values() for f in m["per_fold"]})
    header = ["model"] + [f"fold {k}" for k in folds] + ["mean ± sd", "all (row)"]
    rows = []
    fold_base = {f["fold"]: f for f in next(iter(models.values()))["per_fold"]}
    if fair is not None:
        rows.append(["prevalence baseline (training folds)"] + [fmt(fair["per_fold"].get(k)) for k in folds]
                    + ["", fmt(fair["score_row"])])
    rows.append(["prevalence baseline (in-sample)"] + [fmt(fold_base[k]["baseline_row"]) if k in fold_base
                                                       else "–" for k in folds] + ["", fmt(base["score_row"])])
    for name, m in models.items():
        by = {f["fold"]: f["score_row"] for f in m["per_fold"]}
        vals = np.array(list(by.values()))
        rows.append([name] + [fmt(by.get(k)) for k in folds]
                    + [f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.4f}", fmt(m["score_row"])])
    counts = ["studies"] + [str(fold_base[k]["n_studies"]) if k in fold_base else "–" for k in folds] + ["", ""]
    rows.append(counts)
    lines += [md_table(header, rows), "", "Row-normalised scores; the in-sample baseline uses the prevalence over all "
              "folds of the OOF, the training-folds baseline each fold's own training prevalence.", ""]

    recall = result.get("recall")
    if recall is not None:
        lines += ["## Recall by fracture (synthetic answers)", "",
                  f"From `{result['answers_dir']}/{ANSWERS_NAME}`: the share of fractures whose vertebra is predicted "
                  f"p > {RECALL_THRESHOLD} (a vertebra with two fractures counts once per fracture).", ""]
        for by in ("kind", "subtlety"):
            table = recall[by]
            lines += [f"### By {by}", ""]
            if not table:
                lines += ["No fracture of the answers is among the OOF studies.", ""]
                continue
            rows = [[str(r[by]), str(int(r["fractures"]))] + [fmt(r[n], 3) for n in models] for r in table]
            lines += [md_table([by, "fractures", *models], rows), ""]
        if recall.get("lookalike"):
            lines += ["### False alarms on look-alikes", "",
                      f"Vertebrae with no fracture predicted p > {RECALL_THRESHOLD}, by the look-alike they carry "
                      "(`lookalikes.csv`; none: no look-alike).", ""]
            rows = [[str(r["lookalike"]), str(int(r["vertebrae"]))] + [fmt(r[n], 3) for n in models]
                    for r in recall["lookalike"]]
            lines += [md_table(["look-alike", "vertebrae", *models], rows), ""]

    ceilings = result.get("ceilings")
    if ceilings:
        lines += ["## Ceiling: a perfect detector of some fracture kinds (synthetic answers)", "",
                  "The score if every fracture of these kinds were found (p = 1 - 1e-4 for its vertebra and its "
                  "study) and every other vertebra the prevalence among the rest (in-sample): what a classifier that "
                  "cannot see the remaining kinds could reach at most. Compare with the scores above.", ""]
        rows = [[r["found"], f"{r['fractures_found']} of {r['fractures']}", fmt(r["score"])] for r in ceilings]
        lines += [md_table(["kinds found", "fractures found", "score"], rows), ""]

    lines += ["## Plots", ""]
    for name in models:
        lines += [f"### {name}", ""]
        for kind, caption in (("roc", "ROC curves"), ("calibration", "Reliability"), ("hist", "Prediction histograms")):
            lines += [f"![{caption}: {name}]({kind}_{slug[name]}.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def oof_report(run_dirs: PathLike | Sequence[PathLike], out_dir: PathLike | None = None, *, labels=None,
               answers_dir: PathLike | None = None) -> dict:
    """Score one or several runs' OOF predictions and write `report.md`, `report.json` and PNG plots.

    For each run: row and global scores, per-target contributions and AUCs, per-fold scores, each next to two
    prevalence baselines: the in-sample one (the OOF's own prevalence, which a model cannot know) and the one
    from the training folds (`train_fold_baseline`: each fold's studies predicted with the prevalence of the
    studies its model trained on; the fair reference). ROC curves, reliability diagrams and prediction
    histograms. With several runs, also the mean blend and a blend whose weights are fitted on the OOF itself
    (optimistic), over the studies all runs share. With `answers_dir` (synthetic data), the recall of
    fractured vertebrae by fracture kind and subtlety (`fracture_recall`).

    Args:
        run_dirs: one run folder or several (`runs/<name>` holding `fold<k>/oof.csv` or `oof.csv`).
        out_dir: where to write; default the run folder for one run, `reports/<name>+<name>...` for several.
        labels: optional label table (DataFrame, train.csv path or data root) used for the `_true` columns.
        answers_dir: folder of the synthetic generator's `fractures.csv`; None: no recall tables.

    Returns:
        dict with `out_dir`, `report_md`, `report_json`, `pngs` (list of paths), `scores`
        ({model: {"row", "global"}}), `baseline` (in-sample), `baseline_from_train_folds` (None when a fold's
        training prevalence is unknown), `models` (full numbers per model), `blend_weights`, `runs`,
        `recall` ({"kind": [...], "subtlety": [...]} records, or None).
    """
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, os.PathLike)) else [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("oof_report needs at least one run folder")
    names = []
    for r in run_dirs:
        name = r.resolve().name
        names.append(name if name not in names else f"{r.resolve().parent.name}/{name}")
    oofs = {n: load_oof(r, labels=labels) for n, r in zip(names, run_dirs)}

    # Studies every run predicted, in the first run's order; labels must agree between runs.
    first = oofs[names[0]]
    common = set(first[UID])
    for n in names[1:]:
        common &= set(oofs[n][UID])
    if not common:
        raise ValueError(f"the runs {names} share no study; cannot compare or blend them")
    for n, df in oofs.items():
        if len(df) != len(common):
            log.warning("run %s: %d of its %d studies are not in every run; the report uses the %d shared ones",
                        n, len(df) - len(common), len(df), len(common))
    uids = [u for u in first[UID] if u in common]
    aligned = {n: df.set_index(UID).loc[uids] for n, df in oofs.items()}
    y = aligned[names[0]][list(TRUE_COLUMNS)].to_numpy()
    for n in names[1:]:
        differ = (aligned[n][list(TRUE_COLUMNS)].to_numpy() != y).any(axis=1)
        if differ.any():
            raise ValueError(f"runs {names[0]} and {n} disagree on the labels of {int(differ.sum())} studies, "
                             f"e.g. {np.array(uids)[differ][:3].tolist()}")
    preds = {n: a[list(TARGETS)].to_numpy(np.float64) for n, a in aligned.items()}
    folds = {n: a["fold"].to_numpy() for n, a in aligned.items()}

    blend_weights = None
    if len(names) > 1:
        w = fit_blend_weights(y, list(preds.values()))
        blend_weights = dict(zip(names, w.tolist()))
        preds[MEAN_BLEND] = np.mean(list(preds.values()), axis=0)
        preds[FITTED_BLEND] = np.tensordot(w, np.stack([preds[n] for n in names]), axes=1).clip(0.0, 1.0)
        folds[MEAN_BLEND] = folds[FITTED_BLEND] = folds[names[0]]

    base_row, prev = prevalence_baseline(y, normalise="row")
    baseline = {
        "n_studies": len(uids),
        "score_row": base_row,
        "score_global": prevalence_baseline(y, normalise="global")[0],
        "prevalence": prev.to_dict(),
        "per_target_row": competition_score(y, prev.to_numpy(), normalise="row", per_target=True).to_dict(),
    }
    models = {n: _model_summary(y, p, folds[n]) for n, p in preds.items()}
    lost = {n: studies_without_oof(r, oofs[n]) for n, r in zip(names, run_dirs)}
    for n, info in lost.items():
        if info and info["missing"]:
            log.warning("run %s: %d of the %d studies of its trained folds have no OOF prediction (%s): their "
                        "folder, reading, stage 1 or crops failed (see the crop cache's failures.csv)", n,
                        len(info["missing"]), info["n_expected"], ", ".join(info["missing"][:5]))
    fold_prev = train_fold_prevalence(run_dirs[0], oofs[names[0]])
    fair = train_fold_baseline(y, folds[names[0]], fold_prev)
    recall = ceilings = None
    if answers_dir is not None:
        answers = read_answers(answers_dir)
        recall = fracture_recall(aligned[names[0]].reset_index(), answers, preds)
        ceilings = score_ceilings(uids, y, answers)
        if (Path(answers_dir) / "lookalikes.csv").is_file():
            mimics = pd.read_csv(Path(answers_dir) / "lookalikes.csv", dtype={UID: str})
            recall["lookalike"] = lookalike_false_alarms(aligned[names[0]].reset_index(), answers, mimics, preds)

    if out_dir is None:
        out_dir = run_dirs[0] if len(run_dirs) == 1 else Path("reports") / "+".join(file_slug(n) for n in names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = {n: file_slug(n) for n in preds}
    pngs = []
    for n, p in preds.items():
        title = f"{n} ({len(uids)} studies, OOF)"
        for kind, plot in (("roc", plot_roc), ("calibration", plot_calibration), ("hist", plot_histograms)):
            pngs.append(_save(plot(y, p, title), out_dir / f"{kind}_{slug[n]}.png"))

    result = {
        "runs": names,
        "run_dirs": [str(r) for r in run_dirs],
        "out_dir": str(out_dir),
        "scores": {n: {"row": m["score_row"], "global": m["score_global"]} for n, m in models.items()},
        "baseline": baseline,
        "baseline_from_train_folds": fair,
        "models": models,
        "blend_weights": blend_weights,
        "pngs": [str(p) for p in pngs],
        "recall": None if recall is None else {k: t.to_dict(orient="records") for k, t in recall.items()},
        "ceilings": None if ceilings is None else ceilings.to_dict(orient="records"),
        "answers_dir": None if answers_dir is None else str(answers_dir),
        "studies_without_oof": lost,
    }
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(result, slug) + "\n")
    json_path = out_dir / "report.json"
    result["report_md"], result["report_json"] = str(md_path), str(json_path)
    json_path.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    log.info("OOF report for %s -> %s", ", ".join(names), md_path)
    return result


def oof_tables(result: dict) -> dict[str, pd.DataFrame]:
    """The numbers of an `oof_report` result (or its `report.json`) as DataFrames, for a notebook.

    Returns:
        "summary": one row per baseline and model: studies, row and global score, gain against the
        training-fold baseline (the in-sample one when that is unknown), AUC of patient_overall, mean AUC;
        "per_target": rows TARGETS: prevalence, the baselines' and each model's contribution to the row score
        (`<model>` columns) and AUC (`AUC <model>`); "per_fold": the row score of each model and baseline per
        fold (columns "fold k"); "blend_weights": the fitted blend's weight per run (empty with one run);
        with the generator's answers, "recall_kind" and "recall_subtlety" (share of fractures detected) and
        "ceilings" (`score_ceilings`: the score of a perfect detector of the plainest kinds).
    """
    base, fair, models = result["baseline"], result.get("baseline_from_train_folds"), result["models"]
    reference = fair if fair is not None else base
    summary = []
    if fair is not None:
        summary.append({"model": "prevalence baseline (training folds)", "studies": fair["n_studies"],
                        "score (row)": fair["score_row"], "score (global)": fair["score_global"]})
    summary.append({"model": "prevalence baseline (in-sample)", "studies": base["n_studies"],
                    "score (row)": base["score_row"], "score (global)": base["score_global"]})
    for name, m in models.items():
        summary.append({"model": name, "studies": m["n_studies"], "score (row)": m["score_row"],
                        "score (global)": m["score_global"],
                        "gain vs baseline": reference["score_row"] - m["score_row"],
                        "AUC patient": m["auc"]["patient_overall"], "mean AUC": m["mean_auc"]})
    per_target = pd.DataFrame({"prevalence": pd.Series(base["prevalence"])}, index=list(TARGETS))
    if fair is not None:
        per_target["baseline (training folds)"] = pd.Series(fair["per_target_row"])
    per_target["baseline (in-sample)"] = pd.Series(base["per_target_row"])
    for name, m in models.items():
        per_target[name] = pd.Series(m["per_target_row"])
    for name, m in models.items():
        per_target[f"AUC {name}"] = pd.Series(m["auc"], dtype=float)
    per_fold = {name: {f"fold {f['fold']}": f["score_row"] for f in m["per_fold"]} for name, m in models.items()}
    if fair is not None:
        per_fold = {"prevalence baseline (training folds)": {f"fold {k}": v for k, v in fair["per_fold"].items()},
                    **per_fold}
    tables = {"summary": pd.DataFrame(summary).set_index("model"), "per_target": per_target,
              "per_fold": pd.DataFrame(per_fold).T,
              "blend_weights": pd.Series(result.get("blend_weights") or {}, name="weight", dtype=float)}
    for by, records in (result.get("recall") or {}).items():
        tables[f"recall_{by}"] = pd.DataFrame(records)
    if result.get("ceilings"):
        tables["ceilings"] = pd.DataFrame(result["ceilings"])
    return tables


# ---------------------------------------------------------------------------------------------------------
# Any run: which report a run gets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportKind:
    """How one kind of run is reported (named by its stage, `kit.stages.Stage.report_kind`).

    Attributes:
        task: the `task` key of the run's `fold*/config.yaml`.
        columns: `oof.csv` columns that identify the kind when a run has no config.
        layout: the expected oof.csv layout in words, for error messages.
        write: `write(run_dirs, out_dir, **options) -> result dict` (one run, or several when `combine`).
        combine: runs of this kind given together share one report (the classifier's blends).
    """

    task: str
    columns: tuple[str, ...]
    layout: str
    write: Callable[..., dict]
    combine: bool = False


def _write_cls(run_dirs: Sequence[Path], out_dir: PathLike | None, *, labels=None, answers_dir=None, **_) -> dict:
    result = oof_report(run_dirs, out_dir, labels=labels, answers_dir=answers_dir)
    base = result["baseline"]["score_row"]
    fair = result["baseline_from_train_folds"]
    scores = ", ".join(f"{n} {s['row']:.4f}" for n, s in result["scores"].items())
    baselines = (f"prevalence baseline {fair['score_row']:.4f} (training folds), {base:.4f} (in-sample)"
                 if fair is not None else f"prevalence baseline {base:.4f} (in-sample)")
    return {**result, "kind": "cls", "run": "+".join(result["runs"]), "n_studies": result["baseline"]["n_studies"],
            "headline": f"score (row) {scores} | {baselines}"}


def _write_seg(run_dirs: Sequence[Path], out_dir: PathLike | None, *, n_worst: int = 5, **_) -> dict:
    return seg_report(run_dirs[0], out_dir, n_worst=n_worst)


def _write_level(run_dirs: Sequence[Path], out_dir: PathLike | None, *, n_worst: int = 5, **_) -> dict:
    return level_report(run_dirs[0], out_dir, n_worst=n_worst)


CLS_REPORT = ReportKind("cls", (UID, "fold", *TARGETS), "StudyInstanceUID, fold, patient_overall, C1..C7 "
                        "(probabilities), <target>_true", _write_cls, combine=True)
SEG_REPORT = ReportKind("seg", tuple(SEG_COLUMNS[2:]), "StudyInstanceUID, fold, epoch, slices, dice_C1..dice_C7, "
                        "dice_mean, zerr_C1..zerr_C7, zerr_max", _write_seg)
LEVEL_REPORT = ReportKind("level", tuple(LEVEL_COLUMNS[2:]), "StudyInstanceUID, fold, epoch, steps, iou_C1..iou_C7, "
                          "iou_mean", _write_level)


def report_kinds() -> dict[str, ReportKind]:
    """{task: its report kind}, one per stage (`kit.stages.STAGES`)."""
    from ..stages import STAGES

    return {task: stage.report_kind() for task, stage in STAGES.items()}


def _expected() -> str:
    return "; ".join(f"task {k.task!r} with oof.csv columns {k.layout}" for k in report_kinds().values())


def run_task(run_dir: PathLike) -> str:
    """Which report a run gets: the `task` of its `fold*/config.yaml`, else the one its oof.csv columns fit.

    Raises:
        FileNotFoundError: no run folder, or neither a config with a task nor an oof.csv in it.
        ValueError: folds disagree on the task, the task has no report, or the oof.csv columns fit no kind
            (or several); the message names the run and the layouts expected.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    kinds = report_kinds()
    tasks = {}
    for folder in fold_dirs(run_dir).values():
        if (folder / "config.yaml").is_file():
            values = yaml.safe_load((folder / "config.yaml").read_text())
            if isinstance(values, dict) and values.get("task"):
                tasks[folder.name] = str(values["task"])
    if len(set(tasks.values())) > 1:
        raise ValueError(f"{run_dir}: the folds' config.yaml disagree on the task ({tasks}); one run, one task")
    if tasks:
        task = next(iter(tasks.values()))
        if task not in kinds:
            raise ValueError(f"{run_dir}: config task {task!r} has no report; reports exist for "
                             f"{', '.join(kinds)}")
        return task
    oofs = sorted(p for p in run_dir.glob(f"fold*/{OOF_NAME}") if p.parent.name[4:].isdigit())
    oofs = oofs or [p for p in (run_dir / OOF_NAME,) if p.is_file()]
    if not oofs:
        raise FileNotFoundError(f"{run_dir}: no fold<k>/config.yaml with a task and no {OOF_NAME}; expected a run "
                                f"folder written by kit train: fold<k>/config.yaml, log.csv, {OOF_NAME}")
    header = set(pd.read_csv(oofs[0], nrows=0).columns)
    found = [k.task for k in kinds.values() if header >= set(k.columns)]
    if len(found) != 1:
        raise ValueError(f"{run_dir}: unknown layout: no config.yaml with a task, and the columns of {oofs[0]} "
                         f"({', '.join(sorted(header)[:12])}{', ...' if len(header) > 12 else ''}) fit "
                         f"{'several kinds ' + str(found) if found else 'no report'}; expected {_expected()}")
    return found[0]


def run_report(run_dirs: PathLike | Sequence[PathLike], out_dir: PathLike | None = None, *, n_worst: int = 5,
               labels=None, answers_dir: PathLike | None = None) -> list[dict]:
    """The report of any runs (what `kit report` calls): each run gets the report of its kind (`run_task`).

    Segmenter (`seg_report`) and level-model (`level_report`) runs get one report each; classifier-format
    runs given together share one `oof_report` (scores side by side and their blends).

    Args:
        run_dirs: one run folder or several, of any kinds.
        out_dir: where to write; default each run's own folder (`oof_report`'s default for several
            classifier runs). With several reports, each goes to `out_dir/<run name>`.
        n_worst: worst studies listed (and pictured, for a segmenter) per seg / level report.
        labels: label table for classifier OOF files without `_true` columns (see `load_oof`).
        answers_dir: the synthetic generator's answers folder (`fractures.csv`): classifier reports add the
            recall by fracture kind and subtlety (see `oof_report`).

    Returns:
        One result dict per report, each with at least `kind`, `run`, `n_studies`, `headline`, `out_dir`,
        `report_md`, `report_json`, `pngs`.

    Raises:
        FileNotFoundError, ValueError: a run has an unknown layout (see `run_task`), before anything is written.
    """
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, os.PathLike)) else [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("run_report needs at least one run folder")
    kinds = report_kinds()
    groups: dict = {}
    for run_dir in run_dirs:
        task = run_task(run_dir)
        key = task if kinds[task].combine else (task, len(groups))
        groups.setdefault(key, (task, []))[1].append(run_dir)
    results = []
    for task, runs in groups.values():
        dest = out_dir
        if out_dir is not None and len(groups) > 1:
            dest = Path(out_dir) / "+".join(file_slug(r.resolve().name) for r in runs)
        results.append(kinds[task].write(runs, dest, n_worst=n_worst, labels=labels, answers_dir=answers_dir))
    return results


def summary_table(results: Sequence[dict]) -> str:
    """A short plain-text table of `run_report` results: run, kind, studies, headline, then where each report is."""
    rows = [("run", "kind", "studies", "headline")]
    rows += [(r["run"], r["kind"], str(r["n_studies"]), r["headline"]) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    for r in results:
        lines.append(f"report: {r['report_md']}  ({len(r['pngs'])} plots)")
        missing = r.get("missing_pictures") or {}
        if missing:
            lines.append(f"  {len(missing)} of the worst studies' pictures missing, e.g. "
                         f"{next(iter(missing.values()))}")
    return "\n".join(lines)
