"""The kit's stages, one entry each: everything a run's `task` key stands for.

A `Stage` names the top-level config class (which carries the input recipe, `cfg.recipe()`, and the model,
`cfg.model_spec()`), what its models give a study at inference (`gives`: the role the predictors look for),
its training task (`kit.tasks`: datasets, loss, validation, the OOF writer) and its report
(`kit.evaluate.report`). Loading a config (`kit.config`), training (`kit.tasks.make_task`), loading a run
(`kit.runs.LoadedModel.provides`), predicting (`kit.submit.predictor.predict_study`) and reporting
(`kit report`) all look a stage up here, by its task:

    stage = STAGES["cls"]            # or stage_of(cfg), stage_of("cls")
    stage.config, stage.gives        # ClsConfig, CLASSIFIER
    stage.task_class()(cfg)          # the training task
    stage.report_kind()              # how `kit report` reads and writes its runs

Adding a stage is its config class, its task and report (each where its kind lives) and one entry here. Task
and report are named as "module:attribute" and imported when asked for, so that loading a config needs
neither torch nor the reports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .constants import CLASSIFIER, LEVELS, SEGMENTER
from .stage1.config import LevelConfig, SegConfig
from .stage2.config import ClsConfig


def _attribute(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One trainable stage.

    Attributes:
        task: the `task` key of its YAML configs and saved `config.yaml` files.
        config: its top-level config class (its `recipe()` and `model_spec()`).
        gives: what its models give at inference (`kit.constants.SEGMENTER`, `LEVELS`, `CLASSIFIER`).
        task_path: its training task class, "module:attribute".
        report_path: its report kind (`kit.evaluate.report.ReportKind`), "module:attribute".
    """

    task: str
    config: type
    gives: str
    task_path: str
    report_path: str

    def task_class(self) -> type:
        """The training task class (`kit.tasks`)."""
        return _attribute(self.task_path)

    def report_kind(self):
        """The report kind (`kit.evaluate.report.ReportKind`)."""
        return _attribute(self.report_path)


STAGES: dict[str, Stage] = {s.task: s for s in (
    Stage("seg", SegConfig, SEGMENTER, "kit.tasks:SegTask", "kit.evaluate.report:SEG_REPORT"),
    Stage("level", LevelConfig, LEVELS, "kit.tasks:LevelTask", "kit.evaluate.report:LEVEL_REPORT"),
    Stage("cls", ClsConfig, CLASSIFIER, "kit.tasks:ClsTask", "kit.evaluate.report:CLS_REPORT"),
)}


def stage_of(cfg_or_task) -> Stage:
    """The stage of a config object, a config class or a task name.

    Raises:
        KeyError: no stage has that task (the message lists the stages).
    """
    task = cfg_or_task if isinstance(cfg_or_task, str) else cfg_or_task.task
    if task not in STAGES:
        raise KeyError(f"no stage {task!r}; the stages are {', '.join(STAGES)}")
    return STAGES[task]
