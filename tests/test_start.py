"""Starting checkpoints (`kit:<name>`, kit.models.start) and the frozen backbone."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import kit.models.start as start
from kit.submit.export import sha256_file
from kit.config import load_config
from kit.sections import ConfigError
from kit.models import create_model
from kit.tools.pretrain import export_start, pretrain

SMALL = {"model.encoder": "mobilenetv3_small_050", "model.hidden": 16, "data.image_size": 32,
         "model.pretrained_weights": None, "model.freeze_backbone": False}


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A starting checkpoint of a small classifier exported into a weights folder of the test's own."""
    monkeypatch.setattr(start, "WEIGHTS_DIR", tmp_path / "weights")
    cfg = load_config("demo_cls", **SMALL)
    name, kwargs = cfg.model_spec()
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    with torch.no_grad():
        model.level_bias.copy_(torch.arange(7.0))
        model.train_prevalence.fill_(0.25)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs,
                "config": {"data": {"image_size": 32}}}, ckpt)
    weights, meta = export_start(ckpt, tmp_path / "weights", "tiny", {"command": "kit pretrain ..."})
    return {"model": model, "weights": weights, "meta": meta}


def test_export_is_half_precision_with_provenance_and_loads_into_the_same_model(shipped):
    state = torch.load(shipped["weights"], weights_only=True)
    assert state["gru.weight_ih_l0"].dtype == torch.float16
    assert state["train_prevalence"].dtype == torch.float64  # float64 buffers kept exactly
    meta = json.loads(shipped["meta"].read_text())
    assert meta["sha256"] == sha256_file(shipped["weights"]) and meta["command"] == "kit pretrain ..."
    assert meta["model_kwargs"]["encoder"] == "mobilenetv3_small_050" and meta["image_size"] == 32
    assert start.start_names() == ["tiny"]

    cfg = load_config("demo_cls", **{**SMALL, "model.pretrained_weights": "kit:tiny"})
    name, kwargs = cfg.model_spec()
    loaded = create_model(name, **kwargs, pretrained_weights=cfg.model.pretrained_weights)
    for key, value in shipped["model"].state_dict().items():
        got = loaded.state_dict()[key]
        if value.dtype == torch.float32:
            assert torch.allclose(got, value.half().float()), key
        else:
            assert torch.equal(got, value), key


def test_another_architecture_a_damaged_file_and_an_unknown_name_are_refused(shipped, caplog):
    with pytest.raises(ConfigError, match="hidden 32 here, 16 there"):
        load_config("demo_cls", **{**SMALL, "model.hidden": 32, "model.pretrained_weights": "kit:tiny"}).model_spec()
    with caplog.at_level(logging.WARNING, logger="kit.config"):  # another crop size: the CNN takes it, said once
        load_config("demo_cls", **{**SMALL, "data.image_size": 64, "model.pretrained_weights": "kit:tiny"}).model_spec()
    assert "trained on 32 px crops; data.image_size is 64" in caplog.text
    with pytest.raises(ConfigError, match="shipped: kit:tiny"):
        load_config("demo_cls", **{**SMALL, "model.pretrained_weights": "kit:nothing"}).model_spec()
    shipped["weights"].write_bytes(shipped["weights"].read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        start.start_weights("kit:tiny")


def test_frozen_backbone_keeps_its_weights_and_statistics_while_the_rest_learns():
    cfg = load_config("demo_cls", **{**SMALL, "model.freeze_backbone": True})
    name, kwargs = cfg.model_spec()
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.cnn.training and model.gru.training
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(2, 3, 6, 32, 32)
    for _ in range(2):
        out = model(x, torch.ones(2, 3, dtype=torch.bool))
        out["logit"].sum().backward()
        optimiser.step()
        optimiser.zero_grad()
    after = model.state_dict()
    cnn = [k for k in before if k.startswith("cnn.")]
    assert cnn and all(torch.equal(before[k], after[k]) for k in cnn)  # weights and BatchNorm statistics
    assert not torch.equal(before["gru.weight_ih_l0"], after["gru.weight_ih_l0"])
    assert all(p.grad is None for p in model.cnn.parameters())


def test_pretrain_refuses_the_demos_seeds(tmp_path):
    with pytest.raises(ValueError, match="kept for the demo"):
        pretrain(tmp_path, seed=0)


def test_the_shipped_checkpoint_is_intact_and_builds_demo_cls():
    """kit:cls_lite0_128 as shipped: its sha256 is the one its provenance records, the provenance names the command
    that makes it and a set of no demo seed, and it loads whole into the model `demo_cls` builds."""
    meta = start.start_meta("kit:cls_lite0_128")
    assert meta["command"].startswith("kit pretrain") and meta["set"]["seed"] not in range(100)
    start.start_weights("kit:cls_lite0_128")  # raises on a sha256 mismatch
    cfg = load_config("demo_cls")
    assert cfg.model.pretrained_weights == "kit:cls_lite0_128"
    name, kwargs = cfg.model_spec()
    model = create_model(name, **kwargs, pretrained_weights=cfg.model.pretrained_weights)
    state = torch.load(start.start_weights("kit:cls_lite0_128"), weights_only=True)
    assert set(state) == set(model.state_dict())
    assert torch.equal(model.state_dict()["logit_head.weight"], state["logit_head.weight"].float())


def test_a_checkpoint_trained_on_from_another_names_it(shipped):
    """`kit pretrain ... model.pretrained_weights=kit:<name>` (training on from a shipped checkpoint): the new
    provenance records what it started from, with that checkpoint's sha256, command and training; the command
    line passes the override through."""
    from kit.cli import _parse_overrides, build_parser
    from kit.tools.pretrain import _starting_point

    assert _starting_point("imagenet") == {"weights": "imagenet"}
    assert _starting_point(None) == {"weights": "random"}
    earlier = start.start_meta("kit:tiny")
    traced = _starting_point("kit:tiny")
    assert traced["weights"] == "kit:tiny" and traced["sha256"] == earlier["sha256"] == sha256_file(shipped["weights"])
    assert traced["command"] == earlier.get("command") and traced["training"] == earlier.get("training")
    args = build_parser().parse_args(["pretrain", "--epochs", "3", "model.pretrained_weights=kit:cls_lite0_128",
                                      "optim.lr=0.001"])
    assert _parse_overrides(args.overrides) == {"model.pretrained_weights": "kit:cls_lite0_128", "optim.lr": 0.001}


def test_the_shipped_checkpoint_names_the_chain_of_runs_that_made_it():
    """Its provenance nests each earlier checkpoint it trained on from; the demo's summary counts them."""
    meta = start.start_meta("kit:cls_lite0_128")
    links, training = [], meta["training"]
    while isinstance(training.get("from"), dict):  # each earlier run: its weights, checksum and command
        link = training["from"]
        assert link["weights"] == "kit:cls_lite0_128" and len(link["sha256"]) == 64
        assert link["command"].startswith("kit pretrain ")
        links.append(link)
        training = link["training"]
    assert training["from"].startswith("packaged ImageNet weights")  # the first run started from ImageNet
    assert len(links) >= 1 and start.training_runs(meta) == len(links) + 1
    assert start.training_runs({"training": {"from": "packaged ImageNet weights"}}) == 1
