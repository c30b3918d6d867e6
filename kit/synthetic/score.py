"""Scoring against a synthetic set's answers (`fractures.csv`, `lookalikes.csv`): the test submission's score,
recall by fracture kind and subtlety, false alarms on look-alikes, the attention hit rate and score ceilings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import TARGETS, VERTEBRAE
from ..evaluate.metrics import (
    competition_score,
)
from ..io.rsna import UID, load_train
from ..paths import PathLike

ANSWERS_NAME = "fractures.csv"


ANSWER_COLUMNS = (UID, "split", "vertebra", "kind", "subtlety", "z_first", "z_last")


RECALL_THRESHOLD = 0.5


SUBTLETY_BINS = 3  # numeric subtlety with more distinct values than 5 is grouped into this many equal-count bins


def read_answers(answers_dir: PathLike) -> pd.DataFrame:
    """The synthetic generator's answer table `<answers_dir>/fractures.csv` (one row per fracture).

    Columns `StudyInstanceUID, split, vertebra, kind, subtlety, z_first, z_last`; `vertebra` as "C1".."C7"
    (1..7 is accepted and converted).

    Raises:
        FileNotFoundError: no fractures.csv.
        ValueError: missing columns or a vertebra outside C1..C7.
    """
    path = Path(answers_dir) / ANSWERS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ANSWERS_NAME} in {answers_dir}; the synthetic generator writes it with "
                                "the data")
    table = pd.read_csv(path, dtype={UID: str})
    missing = [c for c in ANSWER_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {list(ANSWER_COLUMNS)}")
    vertebra = table["vertebra"].astype(str).str.strip()
    vertebra = vertebra.where(~vertebra.isin([str(i) for i in range(1, 8)]), "C" + vertebra)
    bad = sorted(set(vertebra) - set(VERTEBRAE))
    if bad:
        raise ValueError(f"{path}: vertebra must be one of {', '.join(VERTEBRAE)}; got {bad[:5]}")
    return table.assign(vertebra=vertebra)


def find_answers_dir(data_root: PathLike) -> Path | None:
    """The synthetic generator's answers folder of a data root, or None (competition data has none).

    Looks at `<data_root>_answers` (where `kit synth --out DIR` writes them) and `<data_root>/../answers`
    (`kit demo`'s `demo/answers` beside `demo/data`); a folder counts when it holds `fractures.csv`.
    """
    root = Path(data_root).resolve()
    for folder in (root.parent / f"{root.name}_answers", root.parent / "answers"):
        if (folder / ANSWERS_NAME).is_file():
            return folder
    return None


def score_test_submission(submission: PathLike | pd.DataFrame, answers_dir: PathLike, data_root: PathLike) -> dict:
    """A submission of the synthetic test split scored against the generator's test labels, next to the
    prevalence baseline (the training labels' prevalence for every row), both by `metrics.score_submission`.

    Args:
        submission: `submission.csv` (path or DataFrame: `row_id, fractured`).
        answers_dir: the generator's answers folder (`test_labels.csv`).
        data_root: the data root, for the training labels (`train.csv`).

    Returns:
        {"test_score", "test_baseline_score", "n_studies"}.

    Raises:
        FileNotFoundError: no `test_labels.csv` in `answers_dir`.
        ValueError: the submission fails `score_submission`'s checks (rows missing, unknown or not numbers).
    """
    from ..io.rsna import split_row_id, wide_to_long
    from ..evaluate.metrics import score_submission

    labels = Path(answers_dir) / "test_labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"no test_labels.csv in {answers_dir}; the synthetic generator writes it")
    solution = wide_to_long(pd.read_csv(labels, dtype={UID: str}))
    prevalence = load_train(data_root)[list(TARGETS)].mean()
    baseline = solution[["row_id"]].assign(fractured=[prevalence[split_row_id(r)[1]] for r in solution["row_id"]])
    return {"test_score": score_submission(submission, solution),
            "test_baseline_score": score_submission(baseline, solution),
            "n_studies": int(len(solution) // len(TARGETS))}


def _subtlety_groups(subtlety: pd.Series) -> pd.Series:
    """Subtlety as groups: its values when few (<= 5 distinct or not numeric), else `SUBTLETY_BINS` equal-count
    bins named by the range of values they hold ("0.1 to 0.35")."""
    numeric = pd.to_numeric(subtlety, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > 5:
        codes = pd.qcut(numeric, SUBTLETY_BINS, labels=False, duplicates="drop")
        spans = numeric.groupby(codes).agg(["min", "max"])
        names = {c: f"{lo:.3g} to {hi:.3g}" for c, (lo, hi) in spans.iterrows()}
        return codes.map(names).astype(str)
    return subtlety.astype(str)


def attention_hit_rate(oof: pd.DataFrame, crop_dir: PathLike, answers: pd.DataFrame,
                       threshold: float = RECALL_THRESHOLD) -> dict:
    """Does the classifier look where the fracture is? Over the fractured vertebrae that have fracture boxes
    (answers' `in_bounding_boxes`) and that the OOF detects (p > threshold): the share whose attention peak
    (`attn_peak_<vertebra>`, the sampled slice with the highest attention weight) lies within one of that
    vertebra's fracture slice ranges [z_first, z_last], widened by half the vertebra's sampling step (so the
    sample nearest a fracture thinner than the step counts).

    Args:
        oof: a classifier OOF table (`attn_peak_C1..C7` and the C1..C7 probabilities).
        crop_dir: the crop cache the OOF was made from (its `positions` map sampled slices to series slices).
        answers: `read_answers` output (synthetic data).

    Returns:
        {"attention_hit_rate": share or NaN, "n_detected": int, "n_boxed": int, "rows": DataFrame (one row per
        detected vertebra: uid, vertebra, p, peak slice, fracture ranges, hit)}.
    """
    from ..stage2.store import load_crops

    boxed = answers[answers["in_bounding_boxes"].astype(bool) & answers[UID].isin(set(oof[UID]))]
    by_uid = oof.set_index(UID)
    rows = []
    for (uid, name), group in boxed.groupby([UID, "vertebra"]):
        p, peak = float(by_uid.at[uid, name]), int(by_uid.at[uid, f"attn_peak_{name}"])
        if p <= threshold or peak < 0:
            continue
        positions = load_crops(crop_dir, uid)["positions"][VERTEBRAE.index(name)]
        step = float(np.median(np.diff(positions))) if len(positions) > 1 else 1.0
        z, tol = int(positions[peak]), max(step, 1.0) / 2.0
        ranges = list(zip(group["z_first"].astype(int), group["z_last"].astype(int)))
        rows.append({UID: uid, "vertebra": name, "p": p, "peak_slice": z, "ranges": ranges,
                     "hit": any(first - tol <= z <= last + tol for first, last in ranges)})
    table = pd.DataFrame(rows, columns=[UID, "vertebra", "p", "peak_slice", "ranges", "hit"])
    n_boxed = int(boxed.groupby([UID, "vertebra"]).ngroups)
    return {"attention_hit_rate": float(table["hit"].mean()) if len(table) else float("nan"),
            "n_detected": len(table), "n_boxed": n_boxed, "rows": table}


def fracture_recall(oof: pd.DataFrame, answers: pd.DataFrame, preds: dict[str, np.ndarray],
                    threshold: float = RECALL_THRESHOLD) -> dict[str, pd.DataFrame]:
    """Recall of fractured vertebrae by fracture kind and by subtlety (synthetic data).

    A fracture counts as detected when its vertebra's predicted probability is above `threshold`; recall is
    the share detected among the answer rows whose study is in the OOF. A vertebra with two fractures counts
    once per fracture (in each fracture's kind).

    Args:
        oof: the OOF table (its `StudyInstanceUID` order is the order of the rows of `preds`).
        answers: `read_answers` output.
        preds: {model: (N, 8) probabilities in TARGETS order, rows as `oof`}.
        threshold: detection threshold.

    Returns:
        {"kind": DataFrame, "subtlety": DataFrame}: one row per group with `fractures` and, per model,
        the recall.
    """
    row_of = {u: i for i, u in enumerate(oof[UID])}
    rows = answers[answers[UID].isin(row_of)].reset_index(drop=True)
    index = rows[UID].map(row_of).to_numpy()
    column = rows["vertebra"].map(TARGETS.index).to_numpy()
    groups = {"kind": rows["kind"].astype(str), "subtlety": _subtlety_groups(rows["subtlety"])}
    out = {}
    for by, keys in groups.items():
        table = pd.DataFrame({by: keys})
        for name, p in preds.items():
            table[name] = (p[index, column] > threshold).astype(np.float64) if len(rows) else []
        grouped = table.groupby(by, sort=True)
        result = grouped.size().rename("fractures").to_frame()
        for name in preds:
            result[name] = grouped[name].mean()
        out[by] = result.reset_index()
    return out


def lookalike_false_alarms(oof: pd.DataFrame, fractures: pd.DataFrame, lookalikes: pd.DataFrame,
                           preds: dict[str, np.ndarray], threshold: float = RECALL_THRESHOLD) -> pd.DataFrame:
    """False alarms on look-alikes (synthetic data): among the vertebrae with no fracture, the share predicted
    p > `threshold`, for those carrying each kind of look-alike (`lookalikes.csv`) and for the rest ("none").

    Args:
        oof: the OOF table (its `StudyInstanceUID` order is the order of the rows of `preds`).
        fractures: `read_answers` output (the fractured vertebrae, left out).
        lookalikes: the generator's `lookalikes.csv` (StudyInstanceUID, kind, vertebra).
        preds: {model: (N, 8) probabilities in TARGETS order, rows as `oof`}.
        threshold: detection threshold.

    Returns:
        One row per look-alike kind and "none": `lookalike`, `vertebrae`, and per model the false-alarm rate.
    """
    uids = list(oof[UID])
    fractured = set(zip(fractures[UID], fractures["vertebra"]))
    mimic = {(u, v): k for u, v, k in zip(lookalikes[UID], lookalikes["vertebra"], lookalikes["kind"])}
    rows = [(i, j, mimic.get((u, v), "none")) for i, u in enumerate(uids) for j, v in enumerate(VERTEBRAE)
            if (u, v) not in fractured]
    table = pd.DataFrame(rows, columns=["row", "column", "lookalike"])
    for name, p in preds.items():
        table[name] = (p[table["row"].to_numpy(int), 1 + table["column"].to_numpy(int)] > threshold
                       ).astype(np.float64) if len(table) else []
    grouped = table.groupby("lookalike", sort=True)
    out = grouped.size().rename("vertebrae").to_frame()
    for name in preds:
        out[name] = grouped[name].mean()
    return out.reset_index()


CEILING_KINDS = ("displaced", "compression", "cleft", "hairline")  # the generator's kinds, plainest first


def ceiling_label(kinds: Sequence[str]) -> str:
    """The `found` label of a `score_ceilings` row (and its key in the demo's `oof_ceilings`)."""
    return " + ".join(kinds)


def score_ceilings(uids: Sequence[str], y: np.ndarray, answers: pd.DataFrame,
                   kinds: Sequence[str] = CEILING_KINDS) -> pd.DataFrame:
    """What a perfect detector of some fracture kinds would score on these studies (synthetic data): the
    ceiling of a classifier that cannot see the other kinds.

    For the first 1, 2, ... of `kinds`: every vertebra with a fracture of those kinds (in `answers`) gets
    p = 1 - 1e-4, and so does patient_overall of its study; every other vertebra (and patient) gets the
    share of fractured ones among those others, their prevalence (in-sample: a ceiling, not a model).

    Args:
        uids: the studies, in the row order of `y`.
        y: (N, 8) labels in TARGETS order.
        answers: `read_answers` output.
        kinds: fracture kinds, added one at a time.

    Returns:
        one row per step: `found` (the kinds found, joined by " + "), `score` (row-normalised competition
        score), `fractures_found` / `fractures` (answer rows of these studies).
    """
    y = np.asarray(y, dtype=np.float64)
    row_of = {u: i for i, u in enumerate(uids)}
    rows = answers[answers[UID].isin(row_of)]
    index = rows[UID].map(row_of).to_numpy()
    column = rows["vertebra"].map(TARGETS.index).to_numpy()
    out = []
    for k in range(1, len(kinds) + 1):
        found = np.zeros_like(y, dtype=bool)
        hit = rows["kind"].isin(kinds[:k]).to_numpy()
        found[index[hit], column[hit]] = True
        found[:, 0] = found[:, 1:].any(axis=1)
        p = np.empty_like(y)
        for c in range(y.shape[1]):
            rest = ~found[:, c]
            p[:, c] = np.where(found[:, c], 1.0 - 1e-4, y[rest, c].mean() if rest.any() else 0.5)
        out.append({"found": ceiling_label(kinds[:k]), "score": competition_score(y, p.clip(1e-4, 1 - 1e-4)),
                    "fractures_found": int(hit.sum()), "fractures": len(rows)})
    return pd.DataFrame(out)
