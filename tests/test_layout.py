"""The package's shape, from its source: no import cycle, no module over 700 lines, the tooling never imported by
the pipeline, and the README's layout names every folder of the package.

Imports are read with `ast` from every module of `kit/`, those inside functions included (a lazy import is still a
dependency, and a cycle through one is still a cycle).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "kit"
MAX_LINES = 700
TOOLING = "kit.tools"
ENTRY_POINTS = {"kit.cli"}  # the console script dispatches to the tooling's commands; nothing below it may


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(KIT.rglob("*.py"))}


def imports_of(path: Path, known: set[str], root: Path = REPO) -> set[str]:
    """The kit modules `path` imports, at any depth of its code; `from pkg import mod` counts as `pkg.mod`."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None. Package `__init__` edges to their own
    modules are left out: `from . import x` in a package's `__init__` is how a package exposes its parts."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if t.startswith(m + "."):  # a package importing its own modules
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package's __init__ exposing its module


def test_imports_of_reads_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "kit" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "kit" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (tmp_path / "kit" / "top.py").write_text("")
    (pkg / "a.py").write_text("from ..top import x\n\ndef f():\n    from . import b\n")
    (pkg / "b.py").write_text("")
    known = {"kit", "kit.top", "kit.sub", "kit.sub.a", "kit.sub.b"}
    assert imports_of(pkg / "a.py", known, root=tmp_path) == {"kit.top", "kit.sub.b"}


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_700_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_pipeline_never_imports_the_tooling():
    edges = graph()
    bad = {m: sorted(t for t in ts if t == TOOLING or t.startswith(TOOLING + "."))
           for m, ts in edges.items()
           if not (m == TOOLING or m.startswith(TOOLING + ".")) and m not in ENTRY_POINTS}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"pipeline modules importing the tooling: {bad}"


def test_readme_layout_names_every_folder():
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", (REPO / "README.md").read_text(), flags=re.S | re.M)
    assert section, "README.md has no '## Layout' section"
    folders = sorted(p.parent.relative_to(REPO).as_posix() + "/" for p in KIT.rglob("__init__.py")
                     if p.parent != KIT)
    missing = [f for f in folders if f not in section.group(1)]
    assert not missing, f"folders of the package the README's layout does not name: {missing}"


@pytest.mark.parametrize("name", ["kit.stage1", "kit.stage2", "kit.io", "kit.evaluate", "kit.submit"])
def test_pipeline_folders_hold_modules(name):
    assert [m for m in modules() if m.startswith(name + ".")], f"{name} holds no module"


def test_one_entry_per_stage_names_everything_its_task_stands_for():
    """Each `kit.stages` entry resolves to its config class (whose `task` is the key), its training task, its report
    kind (for the same task) and a role; loading a config, making a task and loading a run all go through it."""
    from kit.config import load_config
    from kit.constants import CLASSIFIER, LEVELS, SEGMENTER
    from kit.stages import STAGES, stage_of
    from kit.tasks import make_task

    assert set(STAGES) == {"seg", "level", "cls"}
    assert {s.gives for s in STAGES.values()} == {SEGMENTER, LEVELS, CLASSIFIER}
    for task, stage in STAGES.items():
        cfg = load_config(f"demo_{task}")
        assert stage.config().task == task and type(cfg) is stage.config and stage_of(cfg) is stage
        assert type(make_task(cfg)) is stage.task_class() and stage.report_kind().task == task
    with pytest.raises(KeyError, match="the stages are seg, level, cls"):
        stage_of("detect")
