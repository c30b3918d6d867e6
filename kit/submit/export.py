"""Trained runs -> one folder to upload as a Kaggle dataset, with SHA-256 checksums (`kit export`).

`export_runs(["runs/demo_seg", "runs/demo_cls/fold0"], "export")` copies, for every fold of each RUN (a
`runs/<config name>` folder: all its trained folds; or one `fold<k>` folder), the resolved `config.yaml` and the
best weights `model.pt` (never `last.pt`, the resume state) into

    export/
      manifest.json            {"format": "kit-export", "version": 1, "runs": {name: {...}}, "files": {...}}
      demo_seg/fold0/config.yaml, model.pt
      demo_cls/fold0/config.yaml, model.pt
      demo_cls/calibration.json  (when the run has one: `kit calibrate`, applied at inference)

`manifest.json` lists every file with its SHA-256 and size, and per run its task, folds and source folder.
`kit submit --runs export/*` reads the folder back (`kit.submit.predictor.load_runs`: the manifest file itself is
skipped; every file loaded is checked against its checksum first, a mismatch is a `ChecksumError` naming the
file). Exporting again into the same folder replaces the runs exported again and keeps the others.

Run folders are resolved here (`resolve_run`) for export and for loading alike. No torch: configs are read
from their YAML.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..io.files import write_text_atomic
from ..paths import PathLike

log = logging.getLogger("kit.submit.export")

MANIFEST = "manifest.json"
FORMAT = "kit-export"
VERSION = 1
FILES = ("config.yaml", "model.pt")  # per fold; model.pt = the best weights, never last.pt
RUN_FILES = ("calibration.json",)  # per run, when it has one (kit.evaluate.calibration.CALIBRATION_FILE)
_FOLD = re.compile(r"fold(\d+)")
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """An exported file is missing or does not match the checksum its manifest records."""


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_run(path: PathLike) -> tuple[Path, list[int]]:
    """A RUN given on the command line -> (run folder, folds).

    Args:
        path: `runs/<config name>` (every `fold<k>/model.pt` in it) or one `runs/<config name>/fold<k>` folder
            (that fold only).

    Raises:
        FileNotFoundError: no such folder, or no `model.pt` where one is expected (the message says which
            layouts are accepted).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run {path} does not exist; give a run folder (runs/<config name>) or one of its "
                                "fold folders (runs/<config name>/fold<k>)")
    fold = _FOLD.fullmatch(path.name)
    if fold and (path / "model.pt").is_file():
        return path.parent, [int(fold.group(1))]
    if fold:
        raise FileNotFoundError(f"fold folder {path} holds no model.pt (is the fold still training? last.pt is "
                                "not used for inference)")
    folds = sorted(int(m.group(1)) for p in path.glob("fold*/model.pt") if (m := _FOLD.fullmatch(p.parent.name)))
    if not folds:
        raise FileNotFoundError(f"no fold*/model.pt in {path}: give a run folder (runs/<config name>) or a fold "
                                "folder (runs/<config name>/fold<k>) of a trained run")
    return path, folds


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ChecksumError(f"{path} is unreadable ({type(exc).__name__}: {exc}); export the runs again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ChecksumError(f"{path} is not a kit export manifest (format {FORMAT!r} expected)")
    return manifest


def is_manifest(path: PathLike) -> bool:
    """True for an export's `manifest.json` (what `export/*` expands to beside the run folders)."""
    path = Path(path)
    return path.is_file() and path.name == MANIFEST


def verify_run(run_dir: PathLike, folds: Sequence[int]) -> bool:
    """Check the files of `folds` of an exported run against the manifest beside it.

    Returns:
        False when `run_dir` is not inside an export (no `manifest.json` in its parent): nothing to check.
        True when every file matched.

    Raises:
        ChecksumError: the manifest does not list the run or a fold, a file is missing or differs (the message
            names the file, the expected and the actual SHA-256), or the run holds a `calibration.json` the
            manifest does not list.
    """
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir.parent)
    if manifest is None:
        return False
    name = run_dir.name
    if name not in manifest.get("runs", {}):
        raise ChecksumError(f"{run_dir}: run {name!r} is not in {run_dir.parent / MANIFEST} (runs: "
                            f"{', '.join(manifest.get('runs', {})) or 'none'}); export it with kit export")
    files = manifest.get("files", {})
    listed_run_files = [f"{name}/{file}" for file in RUN_FILES if f"{name}/{file}" in files]
    for file in RUN_FILES:  # read at inference when present: one the manifest does not list is refused
        if f"{name}/{file}" not in files and (run_dir / file).exists():
            raise ChecksumError(f"{run_dir / file} is not listed in {run_dir.parent / MANIFEST}, so it cannot be "
                                "checked (added after the export?); export the run again with it, or remove it")
    for rel in [f"{name}/fold{fold}/{file}" for fold in folds for file in FILES] + listed_run_files:
        if rel not in files:
            raise ChecksumError(f"{run_dir.parent / MANIFEST} lists no {rel}; export the run again")
        path = run_dir.parent / rel
        if not path.is_file():
            raise ChecksumError(f"{path} is missing (listed in {run_dir.parent / MANIFEST})")
        actual = sha256_file(path)
        if actual != files[rel]["sha256"]:
            raise ChecksumError(f"{path}: SHA-256 {actual} does not match the manifest's {files[rel]['sha256']} "
                                "(a corrupt or partial upload, or a file changed after export); upload the "
                                "export again")
    return True


def _task(config_path: Path) -> str:
    import yaml

    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    return str(config.get("task", "seg"))


def export_runs(runs: Sequence[PathLike], out_dir: PathLike) -> dict:
    """Copy each run's folds (config.yaml + best model.pt) into `out_dir` and write `manifest.json`.

    Args:
        runs: RUN folders (`resolve_run`): `runs/<config name>` or `runs/<config name>/fold<k>`. Fold folders of
            one run join into one exported run.
        out_dir: the export folder (made; runs already in it are replaced when exported again, others kept).

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError: a RUN cannot be resolved, or a fold lacks its config.yaml.
        ValueError: two different run folders share a name (they would land in one folder).
    """
    out_dir = Path(out_dir)
    chosen: dict[str, tuple[Path, set[int]]] = {}
    for run in runs:
        run_dir, folds = resolve_run(run)
        name = run_dir.name
        if name in chosen and chosen[name][0].resolve() != run_dir.resolve():
            raise ValueError(f"two runs named {name!r}: {chosen[name][0]} and {run_dir}; rename one folder")
        chosen.setdefault(name, (run_dir, set()))[1].update(folds)
        for fold in folds:
            if not (run_dir / f"fold{fold}" / "config.yaml").is_file():
                raise FileNotFoundError(f"{run_dir / f'fold{fold}'} has model.pt but no config.yaml")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out_dir) or {"format": FORMAT, "version": VERSION, "runs": {}, "files": {}}
    for name, (run_dir, folds) in chosen.items():
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{name}/")}
        for fold in sorted(folds):
            (target / f"fold{fold}").mkdir(parents=True)
            for file in FILES:
                source = run_dir / f"fold{fold}" / file
                shutil.copyfile(source, target / f"fold{fold}" / file)
                manifest["files"][f"{name}/fold{fold}/{file}"] = {"sha256": sha256_file(target / f"fold{fold}" / file),
                                                                  "bytes": source.stat().st_size}
        for file in RUN_FILES:  # per-run files, when the run has them
            if (run_dir / file).is_file():
                shutil.copyfile(run_dir / file, target / file)
                manifest["files"][f"{name}/{file}"] = {"sha256": sha256_file(target / file),
                                                       "bytes": (target / file).stat().st_size}
        manifest["runs"][name] = {"task": _task(run_dir / f"fold{min(folds)}" / "config.yaml"),
                                  "folds": sorted(folds), "source": str(run_dir.resolve())}
        log.info("exported %s folds %s -> %s", run_dir, sorted(folds), target)
    manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
