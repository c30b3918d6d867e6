"""Run by tests/test_train.py under torchrun: `fit_fold` with a task that records, on every rank and at every
validation, the validated model's weights and its logits on a fixed probe batch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py CONFIG.yaml OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from kit.config import load_config
from kit.tasks import SegTask
from kit.train import fit_fold


class ProbeTask(SegTask):
    def __init__(self, cfg, out: Path) -> None:
        super().__init__(cfg)
        self.out = out
        self.calls = 0

    def evaluate(self, model, uids, device, autocast):
        result = super().evaluate(model, uids, device, autocast)
        self.calls += 1
        probe = torch.rand(2, self.recipe.n_channels, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(probe.to(device)).cpu()
        torch.save({"probe": probe, "logits": logits, "uids": list(uids),
                    "params": {k: v.detach().cpu().clone() for k, v in model.named_parameters()}},
                   self.out / f"rank{os.environ['RANK']}_eval{self.calls}.pt")
        return result


def main() -> None:
    cfg = load_config(sys.argv[1])
    out = Path(sys.argv[2])
    summary = fit_fold(cfg, ProbeTask(cfg, out))
    if os.environ.get("RANK") == "0":
        (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
