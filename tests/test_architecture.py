"""The package layout: rooms, the one-way arrows between them, no import cycles, the map docs.

Run: .venv/bin/python -m pytest -q tests/test_architecture.py (about 5 s).

Each sub-package (and the single-module rooms tracking, cli) is a room. A room may import
only the rooms listed for it in ALLOWED; the lists are the layers drawn in ARCHITECTURE.md.
Every import counts: module level, inside functions, and type-only ones.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sana_appliance"

# room -> rooms it may import (besides itself and the package root, which holds __version__).
ALLOWED = {
    "core": set(),
    "hub": {"core"},
    "distributed": {"core"},
    "tracking": {"core"},
    "model": {"core", "hub"},
    "config": {"core", "model", "tracking"},
    "data": {"core", "hub", "distributed", "model", "config"},
    "run": {"core", "hub", "distributed", "tracking", "model", "config", "data"},
    "cli": {"core", "hub", "distributed", "tracking", "model", "config", "data", "run"},
    "__main__": {"cli"},
    "benchmarks": {"core", "hub", "distributed", "tracking", "model", "config", "data", "run"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (a `from X import y` of a submodule counts as X.y)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "sana_appliance" and target in known:
                found.add(target)
    return found


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) - {name} for name, path in mods.items()}


def test_every_room_is_known():
    rooms = {room_of(m) for m in modules()} - {"<root>"}
    assert rooms == set(ALLOWED), "a new room needs its arrows in ALLOWED and a place in ARCHITECTURE.md"


def test_layers_point_one_way():
    wrong = []
    for module, targets in graph().items():
        room = room_of(module)
        for target in targets:
            other = room_of(target)
            if other not in (room, "<root>") and other not in ALLOWED.get(room, set()):
                wrong.append(f"{module} imports {target} ({room} -> {other} is not an allowed arrow)")
    assert not wrong, "\n".join(wrong)


def test_allowed_arrows_have_no_cycle():
    seen, active = set(), set()

    def visit(room):
        assert room not in active, f"the allowed arrows loop through {room}"
        if room in seen:
            return
        active.add(room)
        for other in ALLOWED[room]:
            visit(other)
        active.discard(room)
        seen.add(room)

    for room in ALLOWED:
        visit(room)


def test_no_import_cycle_between_modules():
    g = graph()
    # A submodule's package __init__ runs first; that edge is not a dependency of the module itself.
    g = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(g[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(g):
        if module not in state:
            visit(module)


def test_config_resolution_does_not_import_torch():
    """The `config` and `presets` verbs and the stop flag's installation come before any heavy import."""
    code = ("import sys, sana_appliance.cli, sana_appliance.config.resolve, sana_appliance.model.optimizers, "
            "sana_appliance.tracking; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _mapped_paths(text: str) -> set[str]:
    return set(re.findall(r"`(sana_appliance/[A-Za-z0-9_/]+(?:\.py|/))`", text))


def test_readme_map_and_architecture_match_the_tree():
    readme = (ROOT / "README.md").read_text()
    architecture = (ROOT / "ARCHITECTURE.md").read_text()
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py") or "/benchmarks/" in rel:
            continue
        assert f"`{rel}`" in readme, f"README file map lacks {rel}"
    for room in ALLOWED:
        if room in ("__main__",):
            continue
        where = f"sana_appliance/{room}.py" if (PKG / f"{room}.py").exists() else f"sana_appliance/{room}/"
        assert f"`{where}`" in architecture, f"ARCHITECTURE.md does not show the room {where}"
    for doc, text in (("README.md", readme), ("ARCHITECTURE.md", architecture)):
        for mentioned in _mapped_paths(text):
            assert (ROOT / mentioned).exists(), f"{doc} names {mentioned}, which does not exist"


# ---------------------------------------------------------------- one table per extension point


def test_config_choices_come_from_the_tables():
    from sana_appliance.config.schema import OPTIMIZER_ALIASES, field_map
    from sana_appliance.model.optimizers import ALIASES, LR_SCHEDULERS, OPTIMIZERS
    from sana_appliance.run.train import RUN_OUTPUTS
    from sana_appliance.tracking import TRACKERS

    fields = field_map()
    assert fields["optimizer"].metadata["choices"] == tuple(OPTIMIZERS)
    assert fields["lr_scheduler"].metadata["choices"] == LR_SCHEDULERS
    assert fields["report_to"].metadata["choices"] == ("none", *TRACKERS, "all")
    assert {k: v for k, v in OPTIMIZER_ALIASES.items() if v is not None} == ALIASES
    assert all(spec.name in fields["optimizer"].metadata["doc"] for spec in OPTIMIZERS.values())
    assert {spec.folder for spec in TRACKERS.values() if spec.folder} <= set(RUN_OUTPUTS)


ADD_ONE_OPTIMIZER = """
import json, sys, torch
from sana_appliance.model import optimizers
optimizers.OPTIMIZERS["sgd-test"] = optimizers.OptimizerSpec(
    "sgd-test", "torch SGD with momentum (test entry)",
    lambda params, h, bf16: torch.optim.SGD(params, lr=h.lr, momentum=0.9, weight_decay=h.weight_decay),
    optimizers.EXTENDED, state_bytes_fp32=4.0, state_bytes_bf16=5.0, residual_bits=8)
from sana_appliance.config.resolve import resolve      # the schema is built from the table now
from sana_appliance.model.precision import ExtendedPrecision
env = {"WORKSPACE": sys.argv[1], "SANA_OPTIMIZER": "sgd-test", "SANA_MIXED_PRECISION": "bf16", "SANA_USE_EMA": "false",
       "SANA_LEARNING_RATE": "0.1"}
cfg = resolve(env).config
weights = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
opt = optimizers.build_optimizer(cfg, [weights])
weights.grad = torch.ones_like(weights)
opt.step()
print(json.dumps({"optimizer": cfg.optimizer, "wrapped": isinstance(opt, ExtendedPrecision),
                  "inner": type(opt.inner).__name__, "moved": float(weights.float().mean()) < 1.0,
                  "fixed": optimizers.fixed_bytes_per_param(cfg)}))
"""

ADD_ONE_TRACKER = """
import json, sys
from pathlib import Path
from sana_appliance import tracking

class ListTracker(tracking.NullTracker):
    lines = []
    def log(self, step, metrics):
        self.lines.append([step, metrics])

tracking.TRACKERS["list-test"] = tracking.TrackerSpec("list-test", "in memory (test entry)", lambda c: ListTracker())
from sana_appliance.config.resolve import resolve
cfg = resolve({"WORKSPACE": sys.argv[1], "SANA_REPORT_TO": "list-test"}).config
tracker = tracking.build(cfg, Path(sys.argv[1]) / "out", {}, 0, None, None, True)
tracker.log(3, {"loss": 0.5})
tracker.close()
print(json.dumps({"report_to": cfg.report_to, "lines": ListTracker.lines}))
"""


def _run_python(code: str, tmp_path: Path) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_adding_an_optimizer_is_one_table_entry(tmp_path):
    """One OptimizerSpec: the config accepts the name, the builder wraps it for bf16, the memory model knows it."""
    out = _run_python(ADD_ONE_OPTIMIZER, tmp_path)
    assert out == {"optimizer": "sgd-test", "wrapped": True, "inner": "SGD", "moved": True, "fixed": 2 * 2 + 5.0}


def test_adding_a_tracker_is_one_table_entry(tmp_path):
    out = _run_python(ADD_ONE_TRACKER, tmp_path)
    assert out == {"report_to": "list-test", "lines": [[3, {"loss": 0.5}]]}


def test_a_backend_type_and_an_upload_target_come_from_their_tables(tmp_path):
    from sana_appliance.core.errors import ConfigError
    from sana_appliance.core.workspace import Workspace
    from sana_appliance.data.backends import BACKEND_TYPES, parse_data_config
    from sana_appliance.hub.upload import UPLOAD_TARGETS, end_problems

    w = Workspace(root=tmp_path, hf_home=tmp_path / "hf")
    entries = [{"id": "x", "type": "ftp", "instance_data_dir": "d"}, {"id": "t", "type": "local", "dataset_type": "text_embeds", "default": True}]
    with pytest.raises(ConfigError) as err:
        parse_data_config(entries, "test.json", w)
    assert "must be one of " + ", ".join(BACKEND_TYPES) in str(err.value)
    assert list(UPLOAD_TARGETS) == ["checkpoint", "progress", "final"]
    assert any("model_index.json" in p for p in end_problems(tmp_path))  # nothing exported: final/ may not go up
    assert "model_index.json" in UPLOAD_TARGETS["final"].problem(tmp_path, {"id": "final"})
    assert "removed locally" in UPLOAD_TARGETS["checkpoint"].problem(tmp_path, {"id": "checkpoint-8", "step": 8})


def test_readme_key_table_is_the_schema():
    """The README's key table says what the schema says (whose choices come from the tables)."""
    from sana_appliance.config.schema import field_map

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_0-9]+)` \| [^|]+ \| [^|]+ \| (.*) \|$", readme, flags=re.M))
    for name, f in field_map().items():
        assert rows.get(name) == f.metadata["doc"], f"README's row for `{name}` differs from config/schema.py"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_atomic_folder_replaces_in_one_rename_and_leaves_nothing_behind(tmp_path):
    from sana_appliance.core.fsutil import atomic_folder

    dest = tmp_path / "final"
    with atomic_folder(dest) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("one")
    assert _tree(dest) == {"sub/a.txt": b"one"} and oct(dest.stat().st_mode & 0o777) == "0o755"
    (tmp_path / ".final.old-1.tmp").mkdir()  # a crash between the two renames of an earlier replace
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("killed mid-build")
    assert _tree(dest) == {"sub/a.txt": b"one"}, "a failed build must leave the old folder as it was"
    with atomic_folder(dest) as tmp:
        (tmp / "b.txt").write_text("two")
    assert _tree(dest) == {"b.txt": b"two"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"], "temp or aside folders left behind"


def test_atomic_folder_keeps_a_complete_folder_and_replaces_an_incomplete_one(tmp_path):
    from sana_appliance.core.fsutil import atomic_folder

    def done(d):
        return (d / "DONE").is_file()

    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "stray").write_text("incomplete")
    with atomic_folder(dest, existing="keep", is_complete=done) as tmp:
        (tmp / "DONE").write_text("ours")
    assert _tree(dest) == {"DONE": b"ours"}
    with atomic_folder(dest, existing="keep", is_complete=done) as tmp:  # another process finished first
        (tmp / "DONE").write_text("second")
    assert _tree(dest) == {"DONE": b"ours"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with pytest.raises(ValueError), atomic_folder(dest, existing="keep"):
        pass
