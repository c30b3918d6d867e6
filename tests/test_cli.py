"""kit.cli: argument parsing of `kit train` (folds, overrides in any order) and smoke mode; nothing trains here."""

from __future__ import annotations

import pytest

from kit.cli import SMOKE_TRAIN, apply_smoke, build_parser, folds_and_overrides, parse_args, smoke_mode

CONFIG = ["train", "--config", "demo_seg"]


@pytest.mark.parametrize("argv", [
    ["train", "--config", "demo_seg", "--folds", "0", "1", "2", "train.epochs=3"],  # the README's line
    ["train", "--config", "demo_seg", "train.epochs=3", "--folds", "0", "1", "2"],
    ["train", "train.epochs=3", "--config", "demo_seg", "--folds", "0", "1", "2"],
    ["train", "--folds", "0", "1", "--config", "demo_seg", "train.epochs=3", "--folds", "2"],
])
def test_train_folds_and_overrides_in_any_order(argv):
    args = parse_args(argv)
    assert args.config == "demo_seg"
    assert args.folds == [0, 1, 2] and args.overrides == ["train.epochs=3"]
    assert folds_and_overrides(args) == ([0, 1, 2], {"train.epochs": 3})


def test_build_parser_alone_keeps_the_readme_line_and_folds_and_overrides_sorts_it():
    # argparse puts the override into --folds' list; the typed values tell the two apart.
    args = build_parser().parse_args(CONFIG + ["--folds", "0", "1", "2", "train.epochs=3"])
    assert args.folds == [0, 1, 2, "train.epochs=3"] and args.overrides == []
    assert folds_and_overrides(args) == ([0, 1, 2], {"train.epochs": 3})


def test_overrides_split_by_options_and_typed_as_yaml():
    args = parse_args(["train", "optim.lr=1e-3", "--config", "demo_level", "data.repeats=2",
                       "--folds", "4", "train.amp=off", "model.encoder=resnet18"])
    assert args.folds == [4]
    assert folds_and_overrides(args)[1] == {"optim.lr": 1e-3, "data.repeats": 2, "train.amp": "off",
                                             "model.encoder": "resnet18"}


def test_train_defaults_to_fold_0():
    assert folds_and_overrides(parse_args(CONFIG)) == ([0], {})
    assert folds_and_overrides(parse_args(CONFIG + ["train.epochs=1"])) == ([0], {"train.epochs": 1})


@pytest.mark.parametrize("extra, message", [
    (["--folds", "a"], "argument --folds: 'a' is neither a fold number (an int >= 0, e.g. --folds 0 1 2) "
                       "nor a key=value override (e.g. train.epochs=3)"),
    (["--folds", "0", "1.5"], "argument --folds: '1.5' is neither a fold number"),
    (["3"], "argument overrides: '3' is not a key=value override (e.g. train.epochs=3); fold numbers go after --folds"),
    (["=3"], "'=3' is not a key=value override"),
    (["--folds", "1", "1"], "--folds names fold(s) [1] more than once: [1, 1]"),
    (["--folds", "train.epochs=3"], "--folds got no fold number, only overrides ['train.epochs=3']"),
    (["data.fold=2"], "override data.fold=2 clashes with --folds; use --folds 2"),
    (["--folds", "0", "--epochs=3"], "kit train: unrecognized arguments: --epochs=3"),
])
def test_bad_train_command_lines_exit_2_with_a_clear_message(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(CONFIG + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_other_commands_still_reject_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["synth", "--out", "data", "n_train=3"])
    assert exc.value.code == 2 and "unrecognized arguments: n_train=3" in capsys.readouterr().err
    args = parse_args(["synth", "--out", "data", "--n-train", "60"])
    assert (args.out, args.n_train, args.size) == ("data", 60, 128)


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("1e-3", 1e-3), ("2.5", 2.5), (".5", 0.5), ("true", True), ("False", False),
    ("off", "off"), ("yes", "yes"), ("null", None), ("bone", "bone"), ("[1, 2]", [1, 2]), ("runs/x", "runs/x"),
])
def test_override_values_read_as_the_config_expects(text, value):
    parsed = folds_and_overrides(parse_args(CONFIG + [f"k={text}"]))[1]["k"]
    assert parsed == value and type(parsed) is type(value)


# --------------------------------------------------------------------------------------------------------- smoke mode


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("", False), ("0", False), ("off", False)])
def test_smoke_mode_reads_kit_smoke(value, on, monkeypatch):
    monkeypatch.setenv("KIT_SMOKE", value)
    assert smoke_mode() is on
    monkeypatch.delenv("KIT_SMOKE")
    assert smoke_mode() is False


def test_smoke_shrinks_synth_and_prepare_whatever_the_line_says(monkeypatch):
    monkeypatch.setenv("KIT_SMOKE", "1")
    args = parse_args(["synth", "--out", "demo/data", "--n-train", "60"])
    line = apply_smoke(args)
    assert (args.out, args.n_train, args.n_test, args.size, args.n_slices) == ("demo/data", 10, 2, 64, 64)
    assert line == "smoke mode (KIT_SMOKE=1): kit synth: n_train=10 n_test=2 size=64 n_slices=64"
    args = parse_args(["prepare", "--data-root", "d", "--cache-dir", "c", "--size", "128"])
    apply_smoke(args)
    assert (args.data_root, args.cache_dir, args.size) == ("d", "c", 64)


def test_smoke_train_overrides_follow_the_task_and_win(monkeypatch):
    monkeypatch.setenv("KIT_SMOKE", "1")
    args = parse_args(["train", "--config", "demo_seg", "--folds", "0", "1", "2", "train.epochs=3"])
    line = apply_smoke(args)
    folds, overrides = folds_and_overrides(args)
    assert folds == [0, 1, 2]  # the folds stay: the loop over folds is part of what a smoke run checks
    assert overrides == {**SMOKE_TRAIN["seg"]} and overrides["train.epochs"] == 1
    assert "train.epochs=1" in line and "data.image_size=64" in line
    level = parse_args(["train", "--config", "demo_level"])
    apply_smoke(level)
    assert folds_and_overrides(level)[1] == SMOKE_TRAIN["level"]


def test_smoke_train_keys_exist_in_the_configs_of_their_task():
    from kit.config import config_to_dict, load_config

    for name in ("demo_seg", "demo_level"):
        task = load_config(name).task
        resolved = config_to_dict(load_config(name, **SMOKE_TRAIN[task]))  # an unknown key would raise
        for key, value in SMOKE_TRAIN[task].items():
            section, *rest = key.split(".")
            node = resolved[section]
            for part in rest:
                node = node[part]
            assert node == value, (name, key)


def test_smoke_bench_and_commands_without_an_entry(monkeypatch):
    monkeypatch.setenv("KIT_SMOKE", "1")
    read = parse_args(["bench", "read"])
    apply_smoke(read)
    assert (read.slices, read.size, read.configs) == (16, 64, None)
    seg = parse_args(["bench", "seg"])
    apply_smoke(seg)
    assert (seg.configs, seg.slice_counts, seg.size) == (["demo_seg"], [8, 16, 32], 512)
    segment = parse_args(["segment", "--data-root", "d", "--runs", "r", "--out", "o"])
    before = dict(vars(segment))
    assert apply_smoke(segment).endswith("kit segment: nothing changed, it runs as asked")
    assert vars(segment) == before


def test_many_failures_are_shown_in_part_and_counted():
    from kit.cli import _few_failures

    few = {"failed": 2, "failures": {"a": "x", "b": "y"}}
    assert _few_failures(few) is few
    many = {"failed": 25, "failures": {f"u{i}": "no folder" for i in range(25)}}
    shown = _few_failures(many)["failures"]
    assert list(shown)[:10] == [f"u{i}" for i in range(10)] and shown["..."] == "15 more in failures.csv"
    assert len(shown) == 11 and len(many["failures"]) == 25  # the result itself is left whole


def test_submit_options_travel_as_one_object(monkeypatch):
    """`kit submit --mean --weights --tta-flip` become one `InferenceOptions`, plain and picklable for the device
    workers; a bad mean is refused when the options are made."""
    import pickle

    from kit.runs import InferenceOptions
    from kit.submit import predictor

    seen = {}
    monkeypatch.setattr(predictor, "submit", lambda root, runs, out, **kw: seen.update(kw, root=root, runs=runs))
    args = parse_args(["submit", "--data-root", "d", "--runs", "r1", "r2", "--mean", "logit", "--weights", "2", "1",
                       "--tta-flip"])
    args.func(args)
    assert seen["options"] == InferenceOptions(mean="logit", weights=(2.0, 1.0), tta_flip=True)
    assert seen["runs"] == ["r1", "r2"] and pickle.loads(pickle.dumps(seen["options"])) == seen["options"]
    assert InferenceOptions(weights={"a": 2}).weights == {"a": 2.0} and InferenceOptions(weights=[1, 3]).weights == (1.0, 3.0)
    with pytest.raises(ValueError, match="mean must be one of"):
        InferenceOptions(mean="median")
