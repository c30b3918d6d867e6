"""kit.config: packaged configs load, overrides apply and are checked, objects are fresh, save/load round-trips."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from kit.config import CONFIG_DIR, config_from_dict, config_to_dict, list_configs, load_config, save_config
from kit.sections import ConfigError
from kit.stages import STAGES
from kit.stage1.config import SegConfig


def test_packaged_configs_all_load():
    names = list_configs()
    assert {"demo_seg", "demo_level", "seg_unet_effb3_384"} <= set(names)
    for name in names:
        cfg = load_config(name)
        raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        cls = STAGES[raw.get("task", "seg")].config
        assert isinstance(cfg, cls) and cfg.task == raw.get("task", "seg")
        assert cfg.name == name  # the run name is the file stem
        assert str(cfg.run_dir) == f"runs/{name}/fold0"
        # YAML files hold overrides only: every key they set is a real field, and differs from the default
        default = config_to_dict(cls())
        for section, values in raw.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    assert key in default[section], f"{name}: {section}.{key}"


def test_demo_config_is_small_and_full_config_is_gpu_scale():
    demo, full = load_config("demo_seg"), load_config("seg_unet_effb3_384")
    assert demo.data.image_size <= 128 and demo.train.amp == "off" and demo.train.device == "cpu"
    assert demo.recipe().n_slices <= 9 and demo.model_spec()[1]["in_channels"] == demo.recipe().n_channels
    assert full.data.image_size >= 384 and full.data.n_folds == 5 and full.train.amp == "auto"
    assert full.model.encoder.startswith("tu-")


def test_dotted_and_nested_overrides_merge():
    cfg = load_config("demo_seg", **{"train.epochs": 3, "data.fold": 2}, optim={"lr": 0.5},
                      data={"slice_offsets_mm": [-1, 0, 1]})
    assert (cfg.train.epochs, cfg.data.fold, cfg.optim.lr, cfg.data.slice_offsets_mm) == (3, 2, 0.5, [-1.0, 0.0, 1.0])
    # nested dict merged into the YAML's section, not replacing it
    assert cfg.data.image_size == load_config("demo_seg").data.image_size
    assert cfg.model.encoder == "tu-mobilenetv3_small_050"
    # ints are accepted for floats and converted; None for optional fields
    cfg = load_config("demo_seg", **{"optim.lr": 1, "optim.clip_grad": None, "train.patience": 4})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.clip_grad is None and cfg.train.patience == 4


def test_unknown_keys_raise_with_valid_keys_listed():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*epochs.*batch_size"):
        load_config("demo_seg", **{"train.epoch": 3})
    with pytest.raises(ConfigError, match=r"unknown config key 'dataa'.*data, model, optim, train"):
        load_config("demo_seg", dataa={"fold": 1})
    with pytest.raises(ConfigError, match=r"data\.augment\.rotate.*rotate_deg"):
        config_from_dict({"data": {"augment": {"rotate": 5}}})


def test_bad_values_raise():
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config("demo_seg", **{"train.epochs": "3"})
    with pytest.raises(ConfigError, match="train.ema must be true/false"):
        load_config("demo_seg", **{"train.ema": 1})
    with pytest.raises(ConfigError, match=r"train\.amp='fp32'; valid: auto, bf16, fp16, off"):
        load_config("demo_seg", **{"train.amp": "fp32"})
    with pytest.raises(ConfigError, match=r"slice_offsets_mm must be ascending.*include 0"):
        load_config("demo_seg", **{"data.slice_offsets_mm": [-5.0, 5.0]})
    with pytest.raises(ConfigError, match=r"slice_offsets_mm must be ascending"):
        load_config("demo_seg", **{"data.slice_offsets_mm": [5.0, 0.0, -5.0]})
    with pytest.raises(ConfigError, match=r"data\.fold=5 must be in 0\.\.4"):
        load_config("demo_seg", **{"data.fold": 5})
    with pytest.raises(ConfigError, match=r"data\.augment\.crop=72 must be a multiple of the segmenter's stride 16.*64 or 80"):
        load_config("demo_seg", **{"data.augment.crop": 72})
    assert load_config("demo_seg", **{"data.augment.crop": 72, "model.encoder_depth": 3}).data.augment.crop == 72
    stride_2_fpn = r"model\.output_stride must be 1, or 2 with model\.name seg_unet; got 2 \(seg_fpn\)"
    with pytest.raises(ConfigError, match=stride_2_fpn):
        load_config("demo_seg", **{"model.name": "seg_fpn", "model.output_stride": 2})
    with pytest.raises(ConfigError, match=r"model\.output_stride must be 1, or 2 .*got 4"):
        load_config("demo_seg", **{"model.output_stride": 4})
    with pytest.raises(ConfigError, match=r"data\.zoom must be in \[0, 0\.5\); got 0\.6"):
        load_config("demo_level", **{"data.zoom": 0.6})
    with pytest.raises(ConfigError, match="is a section"):
        load_config("demo_seg", train=3)
    with pytest.raises(FileNotFoundError, match="packaged: .*demo_seg"):
        load_config("no_such_config")


def test_yaml11_exponent_floats_are_numbers(tmp_path):
    # PyYAML reads `lr: 5e-3` (no dot) as the string '5e-3'; a float field takes it as the number
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 5e-3\n  weight_decay: 1E-2\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.optim.lr == 0.005 and cfg.optim.weight_decay == 0.01
    assert yaml.safe_load("lr: 5e-3")["lr"] == "5e-3"  # the quirk this guards against
    with pytest.raises(ConfigError, match="optim.lr must be a number; got 'fast'"):
        load_config("demo_seg", **{"optim.lr": "fast"})
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config("demo_seg", **{"train.epochs": "1e1"})  # ints stay strict


def test_objects_are_fresh():
    a, b = load_config("demo_seg"), load_config("demo_seg")
    a.train.epochs = 99
    a.data.augment.rotate_deg = 45.0
    assert b.train.epochs != 99 and b.data.augment.rotate_deg != 45.0
    assert load_config("demo_seg").train.epochs != 99
    assert SegConfig().data.augment is not SegConfig().data.augment
    c = config_from_dict({"train": {"epochs": 1}})
    assert SegConfig().train.epochs != 1 and c.train.epochs == 1


def test_save_load_round_trip(tmp_path):
    cfg = load_config("demo_seg", **{"train.epochs": 7, "data.folds_csv": None, "model.pretrained_weights": "w.pth"})
    path = save_config(cfg, tmp_path / "runs" / "x" / "config.yaml")
    again = load_config(path)
    assert again == cfg and again is not cfg
    assert again.name == "demo_seg"  # the saved file keeps the run name, not its own stem "config"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # a YAML of overrides only: the name comes from the file stem
    (tmp_path / "my_exp.yaml").write_text("data:\n  slice_offsets_mm: [-3, 0, 3]\n")
    mine = load_config(tmp_path / "my_exp.yaml")
    assert mine.name == "my_exp" and mine.data.slice_offsets_mm == [-3.0, 0.0, 3.0]
    assert dataclasses.replace(mine, name="other").name == "other"


def test_the_old_slice_keys_fail_naming_the_new_one(tmp_path):
    for old in ("context", "context_stride", "context_mm", "context_offsets_mm"):
        (tmp_path / "old.yaml").write_text(f"data:\n  {old}: 2\n")
        with pytest.raises(ConfigError, match=rf"old.yaml: config key 'data.{old}' was replaced by data.slice_offsets_mm"):
            load_config(tmp_path / "old.yaml")


def test_the_full_scale_classifier_checkpoints_its_backbone():
    """cls_effv2s_224 trains batches of 16 stacks of 15 x 224^2 on a 16 GB GPU only with activation
    checkpointing: the config asks for it and the model it builds has it on; the demo's does not."""
    from kit.models import create_model

    full, demo = load_config("cls_effv2s_224"), load_config("demo_cls")
    assert full.model.grad_checkpointing and not demo.model.grad_checkpointing
    for cfg, on in ((full, True), (demo, False)):
        name, kwargs = cfg.model_spec()
        assert kwargs["grad_checkpointing"] is on
        model = create_model(name, **{**kwargs, "encoder": "resnet18d"})  # the flag's path, on a small backbone
        assert model.cnn.grad_checkpointing is on


@pytest.mark.parametrize("name", ["demo_seg", "demo_level", "demo_cls"])
def test_every_stage_reads_the_same_studies_and_split_from_one_section(name):
    """The data sections of all stages extend `SourceConfig` (one definition of the studies, folds and stage 1's
    window), and each stage checks it alike: a fold outside the split and an unknown window are refused."""
    from kit.sections import SourceConfig

    cfg = load_config(name)
    assert isinstance(cfg.data, SourceConfig)
    assert {f.name for f in dataclasses.fields(SourceConfig)} <= {f.name for f in dataclasses.fields(cfg.data)}
    with pytest.raises(ConfigError, match="data.window='lung-ish'"):
        load_config(name, **{"data.window": "lung-ish"})
    with pytest.raises(ConfigError, match="data.fold=5 must be in 0..4"):
        load_config(name, **{"data.fold": 5, "data.n_folds": 5})
