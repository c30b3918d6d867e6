"""Out-of-fold (OOF) report: score tables, ROC / calibration / histogram plots and blends of several runs.

The OOF file contract (written by the trainer, read here):

    runs/<run name>/fold<k>/oof.csv     (or a single runs/<run name>/oof.csv)

with the columns `StudyInstanceUID`, `fold`, the 8 predicted probabilities named exactly as TARGETS
(`patient_overall, C1..C7`) and the 8 labels as `<target>_true`.

`oof_report(run_dirs, out_dir)` writes `report.md`, `report.json` and PNGs and returns what it wrote and the
scores. Plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot, so
they work headless and do not touch a notebook's backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from .constants import TARGETS, VERTEBRAE
from .metrics import (
    calibration_table,
    competition_score,
    prevalence_baseline,
    roc_auc,
    roc_auc_per_target,
    roc_curve,
)
from .rsna import check_train, load_train

log = logging.getLogger("kit.report")

PathLike = str | os.PathLike
UID = "StudyInstanceUID"
TRUE_SUFFIX = "_true"
TRUE_COLUMNS = tuple(f"{t}{TRUE_SUFFIX}" for t in TARGETS)
OOF_NAME = "oof.csv"
MEAN_BLEND = "mean blend"
FITTED_BLEND = "fitted blend"
_COLORS = ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


# ---------------------------------------------------------------------------------------------------------
# Reading OOF files
# ---------------------------------------------------------------------------------------------------------


def find_oof_files(run_dir: PathLike) -> list[Path]:
    """The OOF files of a run: `fold*/oof.csv` sorted by fold number, else `oof.csv` at the run root.

    Raises:
        FileNotFoundError: the run folder holds neither.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    per_fold = [p for p in run_dir.glob(f"fold*/{OOF_NAME}") if p.parent.name[4:].isdigit()]
    if per_fold:
        return sorted(per_fold, key=lambda p: int(p.parent.name[4:]))
    if (run_dir / OOF_NAME).is_file():
        return [run_dir / OOF_NAME]
    raise FileNotFoundError(
        f"{run_dir}: no OOF predictions; expected {run_dir}/fold<k>/{OOF_NAME} or {run_dir}/{OOF_NAME}")


def _read_labels(labels) -> pd.DataFrame:
    """A checked label table (StudyInstanceUID + TARGETS) from a DataFrame, a CSV path or a data root folder."""
    if isinstance(labels, pd.DataFrame):
        return check_train(labels, "labels")[[UID, *TARGETS]]
    path = Path(labels)
    if path.is_dir():
        return load_train(path)
    return check_train(pd.read_csv(path, dtype={UID: str}), str(path))[[UID, *TARGETS]]


def load_oof(run_dir: PathLike, *, labels=None) -> pd.DataFrame:
    """All OOF predictions of one run in one table: `StudyInstanceUID, fold, TARGETS..., <target>_true...`.

    Args:
        run_dir: the run folder.
        labels: optional label table (DataFrame, CSV path or data root); when given, the `_true` columns
            come from it (and must agree with the file's own `_true` columns where those exist).

    Raises:
        ValueError: a file lacks contract columns, a probability is outside [0, 1] or NaN, a label is not 0/1,
            a study appears twice, or the labels disagree.
    """
    frames = []
    for path in find_oof_files(run_dir):
        df = pd.read_csv(path, dtype={UID: str})
        need = [UID, "fold", *TARGETS] + ([] if labels is not None else list(TRUE_COLUMNS))
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; an OOF file needs {need}")
        p = df[list(TARGETS)].apply(pd.to_numeric, errors="coerce")
        bad = (p.isna() | (p < 0) | (p > 1)).any(axis=1)
        if bad.any():
            raise ValueError(f"{path}: predictions must be probabilities in [0, 1]; bad rows for "
                             f"{', '.join(df.loc[bad, UID].head(5))} ({int(bad.sum())} in all)")
        frames.append(df)
    oof = pd.concat(frames, ignore_index=True)
    dup = oof[UID][oof[UID].duplicated()]
    if len(dup):
        raise ValueError(f"{run_dir}: studies predicted more than once: {', '.join(dup.head(5))} ({len(dup)} in all)")
    if labels is not None:
        table = _read_labels(labels).set_index(UID)
        lacking = [u for u in oof[UID] if u not in table.index]
        if lacking:
            raise ValueError(f"labels lack {len(lacking)} OOF studies of {run_dir}: {', '.join(lacking[:5])}")
        given = table.loc[oof[UID], list(TARGETS)].to_numpy()
        if all(c in oof.columns for c in TRUE_COLUMNS):
            differ = (oof[list(TRUE_COLUMNS)].to_numpy() != given).any(axis=1)
            if differ.any():
                raise ValueError(f"{run_dir}: the OOF `_true` columns disagree with `labels` for "
                                 f"{', '.join(oof.loc[differ, UID].head(5))} ({int(differ.sum())} studies)")
        oof[list(TRUE_COLUMNS)] = given
    y = oof[list(TRUE_COLUMNS)]
    if not y.isin([0, 1]).all().all():
        raise ValueError(f"{run_dir}: label columns {list(TRUE_COLUMNS)} must hold 0/1")
    oof[list(TRUE_COLUMNS)] = y.astype(np.int64)
    oof["fold"] = oof["fold"].astype(np.int64)
    return oof[[UID, "fold", *TARGETS, *TRUE_COLUMNS]]


# ---------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------


def fit_blend_weights(y: np.ndarray, preds: Sequence[np.ndarray], *, normalise: str = "row") -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the competition score of `sum_r w_r * preds[r]`.

    Fitted on the very predictions it is scored on, so its score is optimistic. Starts from the mean blend
    (equal weights) and never returns weights that score worse than it.
    """
    from scipy.optimize import minimize

    stack = np.stack([np.asarray(p, dtype=np.float64) for p in preds])  # (R, N, 8)
    n = len(stack)
    start = np.full(n, 1.0 / n)

    def objective(w: np.ndarray) -> float:
        w = np.clip(w, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else start
        return competition_score(y, np.clip(np.tensordot(w, stack, axes=1), 0.0, 1.0), normalise=normalise)

    result = minimize(objective, start, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                      options={"maxiter": 200, "ftol": 1e-10})
    w = np.clip(result.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    return w if objective(w) <= objective(start) else start


def _model_summary(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> dict:
    """Scores, per-target contributions, AUCs and per-fold scores of one set of predictions."""
    prev = y.mean(0)
    per_fold = []
    for k in np.unique(folds):
        m = folds == k
        per_fold.append({
            "fold": int(k), "n_studies": int(m.sum()),
            "score_row": competition_score(y[m], p[m], normalise="row"),
            "score_global": competition_score(y[m], p[m], normalise="global"),
            "baseline_row": competition_score(y[m], prev, normalise="row"),
        })
    auc = roc_auc_per_target(y, p)
    return {
        "n_studies": int(len(y)),
        "score_row": competition_score(y, p, normalise="row"),
        "score_global": competition_score(y, p, normalise="global"),
        "per_target_row": competition_score(y, p, normalise="row", per_target=True).to_dict(),
        "auc": auc.to_dict(),
        "mean_auc": float(np.nanmean(auc.to_numpy())) if auc.notna().any() else float("nan"),
        "mean_pred": dict(zip(TARGETS, p.mean(0).tolist())),
        "per_fold": per_fold,
    }


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------

_GROUPS = (("patient_overall", ("patient_overall",)), ("vertebrae C1-C7 (pooled)", VERTEBRAE))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_roc(y: np.ndarray, p: np.ndarray, title: str) -> Figure:
    """ROC curves: patient_overall on the left, C1..C7 on the right; AUCs in the legends."""
    fig = Figure(figsize=(12, 5.2))
    axes = fig.subplots(1, 2)
    for ax, targets in zip(axes, (("patient_overall",), VERTEBRAE)):
        for t in targets:
            j = TARGETS.index(t)
            auc = roc_auc(y[:, j], p[:, j])
            if math.isnan(auc):
                ax.plot([], [], color=_COLORS[j], label=f"{t}: one class only")
                continue
            fpr, tpr = roc_curve(y[:, j], p[:, j])
            ax.plot(fpr, tpr, color=_COLORS[j], lw=2 if t == "patient_overall" else 1.4,
                    label=f"{t}  AUC {auc:.3f}  (n+ {int(y[:, j].sum())})")
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance (AUC 0.5)")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
               ylabel="true positive rate (sensitivity)", aspect="equal")
        ax.set_title("patient_overall" if len(targets) == 1 else "per vertebra", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    fig.suptitle(f"ROC curves: {title}", fontsize=13)
    return fig


def plot_calibration(y: np.ndarray, p: np.ndarray, title: str, n_bins: int = 10) -> Figure:
    """Reliability diagrams for patient_overall and the pooled vertebrae, with prediction counts below."""
    fig = Figure(figsize=(12, 6.2))
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1), hspace=0.08)
    for col, (name, targets) in enumerate(_GROUPS):
        idx = [TARGETS.index(t) for t in targets]
        yy, pp = y[:, idx].ravel(), p[:, idx].ravel()
        table = calibration_table(yy, pp, n_bins)
        ax = fig.add_subplot(grid[0, col])
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
        ax.plot(table["mean_pred"], table["frac_pos"], "o-", color=_COLORS[0 if col == 0 else 1], lw=1.8,
                label=f"model ({n_bins} equal-width bins)")
        ax.axhline(yy.mean(), color="0.3", lw=0.8, ls=":", label=f"prevalence {yy.mean():.3f}")
        ece = float((table["count"] * (table["mean_pred"] - table["frac_pos"]).abs()).sum() / max(len(pp), 1))
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed fraction fractured")
        ax.set_title(f"{name}  (ECE {ece:.3f})", fontsize=11)
        ax.tick_params(labelbottom=False)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8.5)
        hist = fig.add_subplot(grid[1, col], sharex=ax)
        hist.bar((table["bin_lo"] + table["bin_hi"]) / 2, table["count"], width=1.0 / n_bins * 0.9, color="0.55")
        hist.set(xlabel="mean predicted probability", ylabel="predictions", yscale="log")
        hist.yaxis.set_major_formatter(ScalarFormatter())
        hist.yaxis.set_minor_formatter(NullFormatter())
        hist.grid(alpha=0.3)
    fig.suptitle(f"Reliability: {title}", fontsize=13)
    return fig


def plot_histograms(y: np.ndarray, p: np.ndarray, title: str, bins: int = 25) -> Figure:
    """Predicted probabilities split by true label, for patient_overall and the pooled vertebrae."""
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (name, targets) in zip(axes, _GROUPS):
        idx = [TARGETS.index(t) for t in targets]
        yy, pp = y[:, idx].ravel(), p[:, idx].ravel()
        for label, color, text in ((0, "tab:blue", "not fractured"), (1, "tab:red", "fractured")):
            vals = pp[yy == label]
            if len(vals):
                ax.hist(vals, bins=edges, color=color, alpha=0.45, density=True,
                        label=f"{text} (n={len(vals)}, mean p {vals.mean():.3f})")
                ax.hist(vals, bins=edges, color=color, histtype="step", lw=1.4, density=True)
        ax.set(xlim=(0, 1), xlabel="predicted probability of fracture", ylabel="density")
        ax.set_title(name, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", fontsize=8.5)
    fig.suptitle(f"Predictions by true label: {title}", fontsize=13)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _f(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(result: dict, slug: dict) -> str:
    models = result["models"]
    base = result["baseline"]
    lines = [f"# OOF report: {', '.join(result['runs'])}", ""]
    lines += [f"{base['n_studies']} studies with out-of-fold predictions in all runs. Competition metric: weighted "
              "multi-label log loss, lower is better. **row** = per-study normalised (public reference form), "
              "**global** = total weighted loss / total weight. The baseline predicts each target's OOF "
              "prevalence for every study.", ""]
    lines += ["## Summary", ""]
    best = min(m["score_row"] for m in models.values())
    rows = [["prevalence baseline", str(base["n_studies"]), _f(base["score_row"]), _f(base["score_global"]),
             "–", "0.500", "0.500"]]
    for name, m in models.items():
        gain = base["score_row"] - m["score_row"]
        score = _f(m["score_row"])
        rows.append([name, str(m["n_studies"]), f"**{score}**" if m["score_row"] == best else score,
                     _f(m["score_global"]), f"{gain:+.4f}", _f(m["auc"]["patient_overall"], 3), _f(m["mean_auc"], 3)])
    lines += [_table(["model", "studies", "score (row)", "score (global)", "gain vs baseline (row)",
                      "AUC patient", "mean AUC"], rows), ""]
    if result.get("blend_weights"):
        w = result["blend_weights"]
        lines += ["Blends average the runs' probabilities. The *fitted blend*'s weights "
                  f"({', '.join(f'{r} {v:.3f}' for r, v in w.items())}) were chosen on these same OOF predictions "
                  "to minimise the row score, so its score is **optimistic**; judge it on a held-out set.", ""]

    names = list(models)
    lines += ["## Per target", "", "### Contribution to the row score", "",
              "Each column sums to the model's score: where the loss comes from.", ""]
    rows = [[t, _f(base["prevalence"][t], 3), _f(base["per_target_row"][t])]
            + [_f(models[n]["per_target_row"][t]) for n in names] for t in TARGETS]
    rows.append(["**total**", "", f"**{_f(base['score_row'])}**"]
                + [f"**{_f(models[n]['score_row'])}**" for n in names])
    lines += [_table(["target", "prevalence", "baseline", *names], rows), ""]
    lines += ["### ROC AUC and mean prediction", "",
              "AUC per target (– where a target has one class); in brackets the mean predicted probability, "
              "to compare with the prevalence.", ""]
    rows = [[t, str(int(round(base["prevalence"][t] * base["n_studies"]))), _f(base["prevalence"][t], 3)]
            + [f"{_f(models[n]['auc'][t], 3)} ({_f(models[n]['mean_pred'][t], 3)})" for n in names] for t in TARGETS]
    rows.append(["**mean AUC**", "", ""] + [f"**{_f(models[n]['mean_auc'], 3)}**" for n in names])
    lines += [_table(["target", "positives", "prevalence", *names], rows), ""]

    lines += ["## Per fold", ""]
    folds = sorted({f["fold"] for m in models.values() for f in m["per_fold"]})
    header = ["model"] + [f"fold {k}" for k in folds] + ["mean ± sd", "all (row)"]
    rows = []
    fold_base = {f["fold"]: f for f in next(iter(models.values()))["per_fold"]}
    rows.append(["prevalence baseline"] + [_f(fold_base[k]["baseline_row"]) if k in fold_base else "–"
                                           for k in folds] + ["", _f(base["score_row"])])
    for name, m in models.items():
        by = {f["fold"]: f["score_row"] for f in m["per_fold"]}
        vals = np.array(list(by.values()))
        rows.append([name] + [_f(by.get(k)) for k in folds]
                    + [f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.4f}", _f(m["score_row"])])
    counts = ["studies"] + [str(fold_base[k]["n_studies"]) if k in fold_base else "–" for k in folds] + ["", ""]
    rows.append(counts)
    lines += [_table(header, rows), "", "Row-normalised scores; the baseline uses the prevalence over all folds.", ""]

    lines += ["## Plots", ""]
    for name in models:
        lines += [f"### {name}", ""]
        for kind, caption in (("roc", "ROC curves"), ("calibration", "Reliability"), ("hist", "Prediction histograms")):
            lines += [f"![{caption}: {name}]({kind}_{slug[name]}.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_") or "run"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def oof_report(run_dirs: PathLike | Sequence[PathLike], out_dir: PathLike | None = None, *, labels=None) -> dict:
    """Score one or several runs' OOF predictions and write `report.md`, `report.json` and PNG plots.

    For each run: row and global scores, per-target contributions and AUCs, per-fold scores, each next to the
    prevalence baseline; ROC curves, reliability diagrams and prediction histograms. With several runs, also
    the mean blend and a blend whose weights are fitted on the OOF itself (optimistic), over the studies all
    runs share.

    Args:
        run_dirs: one run folder or several (`runs/<name>` holding `fold<k>/oof.csv` or `oof.csv`).
        out_dir: where to write; default the run folder for one run, `reports/<name>+<name>...` for several.
        labels: optional label table (DataFrame, train.csv path or data root) used for the `_true` columns.

    Returns:
        dict with `out_dir`, `report_md`, `report_json`, `pngs` (list of paths), `scores`
        ({model: {"row", "global"}}), `baseline`, `models` (full numbers per model), `blend_weights`, `runs`.
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

    if out_dir is None:
        out_dir = run_dirs[0] if len(run_dirs) == 1 else Path("reports") / "+".join(_slug(n) for n in names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = {n: _slug(n) for n in preds}
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
        "models": models,
        "blend_weights": blend_weights,
        "pngs": [str(p) for p in pngs],
    }
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(result, slug) + "\n")
    json_path = out_dir / "report.json"
    result["report_md"], result["report_json"] = str(md_path), str(json_path)
    json_path.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    log.info("OOF report for %s -> %s", ", ".join(names), md_path)
    return result
