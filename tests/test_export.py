"""kit.submit.export (`kit export`): configs and best weights with SHA-256 checksums in one folder, read back by
`kit.submit.predictor.load_runs` (`kit submit --runs export/*`), a damaged file a clear error. Checkpoints are written
here in `kit.train`'s contract from untrained tiny models (nothing is trained)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kit.config import config_to_dict, load_config, save_config
from kit.submit.export import MANIFEST, ChecksumError, export_runs
from kit.models import create_model
from kit.submit.predictor import load_runs, resolve_runs

torch.set_num_threads(1)


def write_run(runs_dir: Path, config_name: str, folds, **overrides) -> Path:
    """runs/<name>/fold<k>/{config.yaml, model.pt, last.pt} as `kit.train.fit_fold` leaves them."""
    for fold in folds:
        cfg = load_config(config_name, **{"out_dir": str(runs_dir), "data.fold": fold, **overrides})
        torch.manual_seed(fold)
        name, kwargs = cfg.model_spec()
        model = create_model(name, **kwargs)
        cfg.run_dir.mkdir(parents=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        ckpt = {"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs,
                "config": config_to_dict(cfg), "epoch": 1, "metric": 0.5}
        torch.save(ckpt, cfg.run_dir / "model.pt")
        torch.save({**ckpt, "optimizer": {}}, cfg.run_dir / "last.pt")
    return runs_dir / cfg.name


TINY_CLS = {"model.encoder": "mobilenetv3_small_050", "model.hidden": 8, "data.image_size": 32,
            "model.pretrained_weights": None, "model.freeze_backbone": False}
TINY_SEG = {"model.encoder": "tu-mobilenetv3_small_050", "model.encoder_depth": 3, "model.decoder_width": 16,
            "data.image_size": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("export_runs")
    return {"cls": write_run(base / "runs", "demo_cls", (0, 1), **TINY_CLS),
            "seg": write_run(base / "runs", "demo_seg", (0, 1, 2), **TINY_SEG)}


def test_export_copies_configs_and_best_weights_with_checksums(runs, tmp_path):
    out = tmp_path / "export"
    manifest = export_runs([runs["cls"], runs["seg"] / "fold2"], out)
    assert manifest["runs"]["demo_cls"]["folds"] == [0, 1] and manifest["runs"]["demo_cls"]["task"] == "cls"
    assert manifest["runs"]["demo_seg"]["folds"] == [2] and manifest["runs"]["demo_seg"]["task"] == "seg"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, "demo_cls/fold0/config.yaml", "demo_cls/fold0/model.pt",
                            "demo_cls/fold1/config.yaml", "demo_cls/fold1/model.pt",
                            "demo_seg/fold2/config.yaml", "demo_seg/fold2/model.pt"])  # never last.pt
    stored = json.loads((out / MANIFEST).read_text())
    for rel, entry in stored["files"].items():
        data = (out / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        run, fold_file = rel.split("/", 1)
        assert data == (runs[run.removeprefix("demo_")] / fold_file).read_bytes()  # the source run's file

    # kit submit --runs export/*: the manifest is skipped, each run loads with its exported folds
    loaded = load_runs(sorted(out.iterdir()), device="cpu")
    assert [(run[0].config.name, [m.fold for m in run]) for run in loaded] == [("demo_cls", [0, 1]),
                                                                               ("demo_seg", [2])]
    assert [run[0].provides for run in loaded] == ["fractures", "vertebra_probs"]
    original = torch.load(runs["cls"] / "fold1" / "model.pt", weights_only=True)["model"]
    for key, value in loaded[0][1].model.state_dict().items():
        assert torch.equal(value, original[key])

    # exporting again replaces that run, keeps the others
    again = export_runs([runs["seg"]], out)
    assert again["runs"]["demo_seg"]["folds"] == [0, 1, 2] and again["runs"]["demo_cls"]["folds"] == [0, 1]
    assert resolve_runs([out / "demo_seg"]) == [(out / "demo_seg", [0, 1, 2])]


def test_a_damaged_or_unlisted_export_is_a_clear_error(runs, tmp_path):
    out = tmp_path / "export"
    export_runs([runs["cls"]], out)
    weights = out / "demo_cls" / "fold1" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"demo_cls/fold1/model.pt: SHA-256 [0-9a-f]{64} does not match"):
        load_runs([out / "demo_cls"])
    (intact,) = load_runs([out / "demo_cls" / "fold0"])  # the intact fold still loads on its own
    assert [m.fold for m in intact] == [0]

    (out / "demo_cls" / "fold1" / "config.yaml").unlink()
    with pytest.raises(ChecksumError, match="config.yaml is missing"):
        resolve_runs([out / "demo_cls" / "fold1"])
    stray = out / "other" / "fold0"
    stray.mkdir(parents=True)
    (stray / "model.pt").write_bytes(b"x")
    with pytest.raises(ChecksumError, match="run 'other' is not in"):
        resolve_runs([out / "other"])
    with pytest.raises(ValueError, match="two runs named 'demo_cls'"):
        export_runs([runs["cls"], out / "demo_cls" / "fold0"], tmp_path / "again")


def test_kit_export_command_line(runs, tmp_path, capsys):
    from kit.cli import main

    main(["export", str(runs["cls"]), str(runs["seg"]), "--out", str(tmp_path / "export")])
    printed = capsys.readouterr().out
    assert "demo_cls: task cls, folds [0, 1]" in printed and "demo_seg: task seg, folds [0, 1, 2]" in printed
    assert "10 files with SHA-256" in printed


def test_a_run_calibration_travels_with_the_export_and_is_checked(runs, tmp_path):
    import shutil

    from kit.evaluate.calibration import read_calibration, write_calibration
    from kit.constants import TARGETS
    from kit.submit.export import verify_run

    run = tmp_path / "runs" / "demo_cls"
    shutil.copytree(runs["cls"], run)
    calibration = {t: {"a": 0.5, "b": -1.0} for t in TARGETS}
    write_calibration(run, calibration)
    out = tmp_path / "export"
    manifest = export_runs([run / "fold1"], out)  # one fold: the run's calibration still goes along
    assert "demo_cls/calibration.json" in manifest["files"]
    assert read_calibration(out / "demo_cls") == calibration and verify_run(out / "demo_cls", [1])
    (out / "demo_cls" / "calibration.json").write_text("{}")
    with pytest.raises(ChecksumError, match="calibration.json"):
        verify_run(out / "demo_cls", [1])


def test_a_calibration_the_manifest_does_not_list_is_refused(runs, tmp_path):
    """A run exported without a calibration, then given one in the export folder (not in the manifest): loading
    it would apply an unchecked map, so verify_run refuses it, naming the file. (It used to be loaded unchecked.)"""
    from kit.evaluate.calibration import write_calibration
    from kit.constants import TARGETS
    from kit.submit.export import verify_run

    out = tmp_path / "export"
    export_runs([runs["cls"]], out)
    assert verify_run(out / "demo_cls", [0, 1])
    write_calibration(out / "demo_cls", {t: {"a": 0.0, "b": 5.0} for t in TARGETS})
    with pytest.raises(ChecksumError, match="calibration.json is not listed"):
        verify_run(out / "demo_cls", [0, 1])
    with pytest.raises(ChecksumError, match="not listed"):
        load_runs([out / "demo_cls"])
