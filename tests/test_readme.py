"""The README's commands are code: every `kit ...` line of its "Command line" block runs here as written.

How: the lines run one after the other, in the order of the block, in one temporary working directory,
through the installed `kit` console script (`Path(sys.executable).parent / "kit"`), with the environment
variable KIT_SMOKE=1. Smoke mode is read only by `kit.cli` and shrinks each command to a tiny run that
still goes end to end (10 studies of 64 x 64 x 64, one epoch on a few slices, small benchmarks; the table is
`kit.cli.SMOKE_ARGS` / `SMOKE_TRAIN`) and says so on its first output line. The lines themselves are not
edited: only the trailing `# comment` is stripped and the README's one placeholder, `<config>` in
`kit report runs/<config>`, becomes `demo_seg` (the run the lines before it made). PYTHONPATH points at this
checkout, so the `kit` script imports the package next to these tests even where the venv's editable install
points at another worktree.

Each line is one test case (in the block's order; a failed line leaves the later ones failing too) and
then checks what the line should have left behind.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KIT = Path(sys.executable).parent / "kit"
PLACEHOLDERS = {"<config>": "demo_seg"}

pytestmark = pytest.mark.slow  # ~1-1.5 min on a busy 2-core CPU, all lines together


def readme_commands(text: str) -> list[str]:
    """The `kit` lines of the fenced bash block under the '## Command line' heading, comments stripped.

    Raises:
        ValueError: no such heading or block, or a line in the block that is neither a comment nor `kit ...`.
    """
    section = re.search(r"^## Command line\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if section is None:
        raise ValueError("README.md has no '## Command line' section")
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M)
    if block is None:
        raise ValueError("README.md's '## Command line' section has no ```bash block")
    commands = []
    for raw in block.group(1).splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if not line.startswith("kit "):
            raise ValueError(f"README command block: {raw!r} is not a `kit ...` line")
        commands.append(line)
    return commands


def fill_placeholders(line: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        line = line.replace(placeholder, value)
    left = re.findall(r"<[^<>]+>", line)
    if left:
        raise ValueError(f"{line!r}: no value for placeholder(s) {left}; add them to PLACEHOLDERS")
    return line


COMMANDS = readme_commands(README.read_text())


def _case(index: int, line: str):
    return pytest.param(index, line, id=f"{index}-{line}")


def test_readme_block_holds_the_pipeline_in_order():
    verbs = [shlex.split(line)[1] for line in COMMANDS]
    assert verbs == ["synth", "prepare", "train", "train", "segment", "crops", "train", "report", "calibrate",
                     "submit", "bench", "bench", "bench", "bench", "bench", "bench", "pretrain"]
    assert "kit train --config demo_seg --folds 0 1 2 train.epochs=3" in COMMANDS  # the line that once failed
    with pytest.raises(ValueError, match="is not a `kit ...` line"):
        readme_commands("## Command line\n\n```bash\npython -m kit.cli synth\n```\n")
    assert fill_placeholders("kit report runs/<config>") == "kit report runs/demo_seg"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    if not KIT.is_file():
        pytest.fail(f"no `kit` console script at {KIT}; install the package (pip install -e .)")
    return tmp_path_factory.mktemp("readme")


def run_line(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(fill_placeholders(line))
    env = {**os.environ, "KIT_SMOKE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([str(KIT), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _value(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def check_artefacts(argv: list[str], ws: Path, stdout: str) -> None:
    """What each command must have left in the working directory (or printed)."""
    verb = argv[1]
    if verb == "synth":
        root = ws / _value(argv, "--out")
        train = pd.read_csv(root / "train.csv")
        assert len(train) == 10  # smoke size, whatever --n-train says
        assert len(list((root / "segmentations").glob("*.nii"))) == 5
        assert len(list((root / "test_images").iterdir())) == 2
    elif verb == "prepare":
        cache = ws / _value(argv, "--cache-dir")
        expected = 5 if "--segmented-only" in argv else 10  # the smoke set's segmented studies, or all of them
        assert len(list(cache.glob("*.npz"))) == expected
    elif verb == "train":
        from kit.config import load_config

        cfg = load_config(_value(argv, "--config"))
        folds = [int(a) for a in argv[argv.index("--folds") + 1:] if a.isdigit()]
        for fold in folds:
            run = ws / cfg.out_dir / cfg.name / f"fold{fold}"
            assert (run / "model.pt").is_file() and (run / "oof.csv").is_file(), f"{run} lacks model.pt / oof.csv"
            assert len(pd.read_csv(run / "log.csv")) == 1  # smoke: one epoch, not train.epochs=3
    elif verb == "segment":
        out = ws / _value(argv, "--out")
        summary = pd.read_csv(out / "summary.csv")
        assert len(summary) == 2 and len(list(out.glob("*.npz"))) == 2  # the 2 smoke test studies
    elif verb == "crops":
        manifest = pd.read_csv(ws / "demo" / "crops" / "manifest.csv")  # demo_cls's data.crop_dir
        assert len(manifest) == 10 and len(list((ws / "demo" / "crops").glob("*.npz"))) == 10
    elif verb == "submit":
        submission = pd.read_csv(ws / _value(argv, "--out"))
        assert len(submission) == 2 * 8 and submission["fractured"].between(0, 1).all()  # the 2 smoke test studies
    elif verb == "report":
        reports = list((ws / argv[2]).rglob("report.md"))
        assert reports, f"no report.md under {ws / argv[2]}"
    elif verb == "calibrate":
        assert "OOF score" in stdout and "cross-fitted" in stdout
        written = (ws / argv[2] / "calibration.json").is_file()
        assert written == ("wrote " in stdout)  # kept only when it helped out of fold, as printed
    elif verb == "pretrain":  # smoke: exported beside its working folder, never over the shipped checkpoint
        import json

        meta = json.loads((ws / "runs" / "cls_start_smoke" / "cls_lite0_128.json").read_text())
        assert meta["command"].startswith("kit pretrain") and meta["set"]["seed"] not in range(100)
        assert (ws / "runs" / "cls_start_smoke" / "cls_lite0_128.pt").is_file() and "held-out fold" in stdout
    elif verb == "bench":
        assert re.search(r"\d", stdout), "a benchmark prints its figures"


@pytest.mark.parametrize("index, line", [_case(i, line) for i, line in enumerate(COMMANDS)])
def test_readme_command_runs_as_written(index, line, workspace):
    result = run_line(line, workspace)
    log = f"$ {line}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert result.returncode == 0, log
    verb = shlex.split(line)[1]
    assert result.stdout.startswith(f"smoke mode (KIT_SMOKE=1): kit {verb}"), log
    check_artefacts(shlex.split(fill_placeholders(line)), workspace, result.stdout)


def test_full_scale_recipe_parses_and_its_configs_load(tmp_path):
    """The '## Full scale' block cannot run here (a GPU, the competition data): each line parses as the `kit`
    CLI parses it, every config it names loads with its overrides, and the classifier's crops come from the
    stage-1 runs the block trains."""
    from kit.cli import _parse_overrides, folds_and_overrides, parse_args
    from kit.config import load_config

    section = re.search(r"^## Full scale[^\n]*\n(.*?)(?=^## |\Z)", README.read_text(), flags=re.S | re.M)
    assert section is not None, "README.md has no '## Full scale' section"
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M).group(1)
    lines = [raw.split(" #", 1)[0].strip() for raw in block.splitlines() if raw.strip()]
    assert all(line.startswith("kit ") for line in lines)
    trained, cls_configs = [], []
    for line in lines:
        args = parse_args(shlex.split(line.replace("$DATA", str(tmp_path)))[1:])
        if args.command == "train":
            folds, overrides = folds_and_overrides(args)
            assert folds == [0, 1, 2, 3, 4]
            cfgs = [load_config(args.config, **{**overrides, "data.fold": f}) for f in folds]
            assert cfgs[0].data.data_root == str(tmp_path) and cfgs[0].model.pretrained_weights.endswith(".pth")
            trained.append(str(Path(cfgs[0].out_dir) / cfgs[0].name))
        elif args.command == "crops":
            cls_configs.append(load_config(args.config, **_parse_overrides(args.overrides)))
    assert trained == ["runs/seg_unet_effb3_384", "runs/level_effb0_128", "runs/cls_effv2s_224"]
    assert len(cls_configs) == 1 and cls_configs[0].data.seg_runs == trained[:2]
