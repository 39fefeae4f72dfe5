"""Resume never lies: the current config decides every hyperparameter, damaged checkpoints
are moved aside (never looped on), one run per output folder, metrics.jsonl appended once.

Run: pytest tests/test_resume.py   (~2 minutes on 2 cores; uses the shared demo run)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_env, run_cli, start_cli
from safetensors.torch import load_file
from test_checkpoints import Reader, save_dummy

from sana_appliance.config.schema import TrainConfig
from sana_appliance.core.errors import ConfigError
from sana_appliance.model import optimizers
from sana_appliance.run import checkpoints
from sana_appliance.tracking import JsonlTracker

# ---------------------------------------------------------------- hyperparameters on resume

BEFORE = {"learning_rate": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 0.0,
          "adam_epsilon": 1e-8, "lr_scheduler": "constant", "lr_warmup_steps": 0}
CHANGES = {"learning_rate": 5e-2, "adam_beta1": 0.5, "adam_beta2": 0.9, "adam_weight_decay": 0.25,
           "adam_epsilon": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 6}


def _trained_state(cfg: TrainConfig, params: list[torch.nn.Parameter], steps: int, total: int):
    opt = optimizers.build_optimizer(cfg, params, min_8bit_size=1)
    sched = optimizers.build_lr_scheduler(cfg, opt, total)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    return opt.state_dict(), sched.last_epoch


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
@pytest.mark.parametrize("optimizer", ["optimi-adamw", "adamw", "adamw8bit", "bnb-lion8bit", "lion"])
@pytest.mark.parametrize("key", sorted(CHANGES))
def test_resumed_optimizer_follows_the_current_config(optimizer, key):
    """Each resumable hyperparameter, changed between save and resume, is what the next step uses."""
    torch.manual_seed(0)
    old = dataclasses.replace(TrainConfig(), optimizer=optimizer, **BEFORE)
    new = dataclasses.replace(old, **{key: CHANGES[key]})
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    saved, sched_steps = _trained_state(old, params, steps=4, total=20)

    resumed = optimizers.build_optimizer(new, params, min_8bit_size=1)
    resumed.load_state_dict(saved)
    optimizers.apply_hyperparameters(new, resumed)
    sched = optimizers.build_lr_scheduler(new, resumed, 20, completed_steps=sched_steps)

    fresh = optimizers.build_optimizer(new, params, min_8bit_size=1)  # what `new` means for this library
    fresh_sched = optimizers.build_lr_scheduler(new, fresh, 20)
    for _ in range(sched_steps):
        fresh_sched.step()
    for group, want in zip(resumed.param_groups, fresh.param_groups):
        for name in optimizers.CONFIG_GROUP_KEYS & want.keys() - {"lr"}:
            assert group[name] == want[name], (name, group[name], want[name])
        assert group["lr"] == pytest.approx(want["lr"]) and group["initial_lr"] == new.learning_rate
    assert sched.get_last_lr() == pytest.approx(fresh_sched.get_last_lr())
    # The loaded moments survive: only hyperparameters were replaced.
    for got, want in zip(resumed.state_dict()["state"].values(), saved["state"].values()):
        for name, value in want.items():
            if torch.is_tensor(value):
                assert torch.equal(got[name], value), name
    if optimizer == "optimi-adamw":  # optimi keeps its step count in the group
        assert int(resumed.param_groups[0]["step"]) == 4


@pytest.mark.parametrize("optimizer", ["lion", "bnb-lion8bit"])
def test_resumed_update_has_the_new_learning_rate(optimizer):
    """Lion's update is lr * sign(.): after a resume at 5e-2 every weight moves by exactly 5e-2."""
    torch.manual_seed(0)
    old = dataclasses.replace(TrainConfig(), optimizer=optimizer, **BEFORE)
    new = dataclasses.replace(old, learning_rate=5e-2)
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    saved, sched_steps = _trained_state(old, params, steps=3, total=20)
    resumed = optimizers.build_optimizer(new, params, min_8bit_size=1)
    resumed.load_state_dict(saved)
    optimizers.apply_hyperparameters(new, resumed)
    optimizers.build_lr_scheduler(new, resumed, 20, completed_steps=sched_steps)
    before = params[0].detach().clone()
    params[0].grad = torch.randn_like(params[0])
    resumed.step()
    moved = (params[0].detach() - before).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 5e-2), rtol=1e-4), moved.max()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_a_new_learning_rate_trains_logs_and_records_it(shared_workspace, tmp_path):
    """Must show: 1e-3 -> 5e-2 on resume; metrics.jsonl shows the new schedule, run.json and the
    model card record it, the model card keeps the first run's start eval loss."""
    out = tmp_path / "out"
    first = {"SANA_MAX_TRAIN_STEPS": "8", "SANA_LEARNING_RATE": "1e-3", "SANA_LR_WARMUP_STEPS": "0",
             "SANA_VALIDATION_STEPS": "0", "SANA_USE_EMA": "false"}
    run1 = run_cli(cli_env(shared_workspace, out, **first))
    assert run1.returncode == 0, run1.stderr[-3000:]
    start_eval = _metrics(out)[0]["eval_loss"]
    second = {**first, "SANA_MAX_TRAIN_STEPS": "12", "SANA_LEARNING_RATE": "5e-2", "SANA_LR_SCHEDULER": "cosine",
              "SANA_ADAM_WEIGHT_DECAY": "0.01", "SANA_USE_EMA": "true", "SANA_EMA_DECAY": "0.999999"}
    run2 = run_cli(cli_env(shared_workspace, out, **second))
    assert run2.returncode == 0, run2.stderr[-3000:]
    assert "resumed from checkpoint-8" in run2.stderr
    assert "learning_rate: checkpoint 0.001 -> now 0.05" in run2.stderr

    lines = [m for m in _metrics(out) if "lr" in m]
    assert [m["step"] for m in lines] == list(range(1, 13))  # each step once
    assert all(m["lr"] == pytest.approx(1e-3) for m in lines[:8])
    # Step k applies the cosine rate of k-1 completed steps over the new length of 12.
    want = [5e-2 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 12)) for k in range(9, 13)]
    assert [m["lr"] for m in lines[8:]] == pytest.approx(want)
    assert lines[8]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 8 / 12)))

    run = json.loads((out / "run.json").read_text())
    assert run["config"]["learning_rate"] == 0.05 and run["config"]["lr_scheduler"] == "cosine"
    assert run["eval_loss"]["start"] == start_eval and run["eval_loss"]["start_step"] == 0
    card = (out / "final" / "README.md").read_text()
    assert "0.05" in card and f"start (step 0): {start_eval:.5f}" in card

    # EMA switched on at the resume starts from the resumed weights, not from the base model's
    # (with decay 1 - 1e-6 it barely moves from where it started in 4 updates).
    resumed_from = load_file(out / "checkpoints" / "checkpoint-8" / "transformer.safetensors")
    ema = load_file(out / "transformer_ema.safetensors")
    assert max(float((ema[k] - resumed_from[k]).abs().max()) for k in ema) < 1e-5


def test_a_changed_seed_is_honoured_or_nothing(shared_workspace, tmp_path):
    """A new seed on resume draws new noise (not the checkpoint's stream), and says so."""
    base = {"SANA_MAX_TRAIN_STEPS": "8", "SANA_VALIDATION_STEPS": "0", "SANA_USE_EMA": "false"}
    outs = {}
    for seed in ("42", "7"):
        out = tmp_path / f"seed{seed}"
        assert run_cli(cli_env(shared_workspace, out, **base)).returncode == 0
        resumed = run_cli(cli_env(shared_workspace, out, **{**base, "SANA_MAX_TRAIN_STEPS": "10", "SANA_SEED": seed}))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        outs[seed] = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert outs["42"][:8] == outs["7"][:8]
    assert outs["42"][8:] != outs["7"][8:]


# ---------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "transformer.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "missing state file": lambda c: (c / "trainer_state.json").unlink(),
    "flipped byte": lambda c: _flip_byte(c / "transformer.safetensors"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_used(tmp_path, caplog, damage):
    for step in (10, 20, 30):
        save_dummy(tmp_path, step)
    DAMAGE[damage](tmp_path / "checkpoint-30")
    with caplog.at_level("WARNING"):
        ref = checkpoints.find_resume("latest", tmp_path)
    assert ref.step == 20
    aside = tmp_path / "checkpoint-30.damaged"
    assert aside.is_dir() and not (tmp_path / "checkpoint-30").exists()  # kept, never deleted
    assert "checkpoint-30 is damaged" in caplog.text and "checkpoint-30.damaged" in caplog.text
    named = {"truncated weights": "transformer.safetensors", "truncated optimizer": "optimizer.pt",
             "missing state file": "trainer_state.json", "flipped byte": "transformer.safetensors"}[damage]
    assert named in caplog.text and named in (aside / "DAMAGED.json").read_text()
    # No loop: the next start finds the same intact checkpoint without touching anything.
    assert checkpoints.find_resume("latest", tmp_path).step == 20
    assert [r.step for r in checkpoints.list_checkpoints(tmp_path)[0]] == [10, 20]
    # Asked for by name, a damaged checkpoint is refused (exit 2, naming the file), not moved.
    (tmp_path / "checkpoint-20" / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="checkpoint-20 is damaged.*optimizer.pt"):
        checkpoints.find_resume("checkpoint-20", tmp_path)
    assert (tmp_path / "checkpoint-20").is_dir()


def test_old_marker_without_manifest_is_still_checked(tmp_path):
    for step in (1, 2):
        path = save_dummy(tmp_path, step)
        (path / checkpoints.MARKER).write_text(json.dumps({"step": step}))  # format 1
    _truncate(tmp_path / "checkpoint-2" / "transformer.safetensors")
    assert checkpoints.find_resume("latest", tmp_path).step == 1
    assert (tmp_path / "checkpoint-2.damaged").is_dir()


def test_all_checkpoints_damaged_starts_fresh_and_says_so(tmp_path, caplog):
    save_dummy(tmp_path, 5)
    _truncate(tmp_path / "checkpoint-5" / "transformer.safetensors")
    with caplog.at_level("WARNING"):
        assert checkpoints.find_resume("latest", tmp_path) is None
    assert "no intact checkpoint" in caplog.text


def test_truncated_transformer_in_newest_checkpoint_resumes_from_previous(demo_run, tmp_path):
    """Must show: the run resumes from the previous checkpoint, says so, and finishes."""
    reference, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "TRAINING_COMPLETE.json").unlink()
    shutil.rmtree(out / "final")
    _truncate(out / "checkpoints" / "checkpoint-16" / "transformer.safetensors")
    env = cli_env(reference.parent, out)
    result = run_cli(env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-16 is damaged (transformer.safetensors" in result.stderr
    assert "resumed from checkpoint-8" in result.stderr
    assert (out / "checkpoints" / "checkpoint-16.damaged").is_dir()
    assert (out / "checkpoints" / "checkpoint-16" / checkpoints.MARKER).is_file()  # retrained and saved again
    again = run_cli(env)
    assert again.returncode == 0 and "already finished at step 16" in again.stderr


# ---------------------------------------------------------------- one run per output folder


def test_second_run_on_the_same_output_is_refused_at_once(shared_workspace, tmp_path):
    out = tmp_path / "out"
    env = cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="40", SANA_VALIDATION_STEPS="0")
    first = start_cli(env)
    reader = Reader(first)
    try:
        assert reader.wait_for("held-out eval loss at step 0", timeout=240), reader.text()[-3000:]
        t0 = time.monotonic()
        second = run_cli(env)
        assert second.returncode == 2, second.stderr[-3000:]
        assert time.monotonic() - t0 < 30
        assert f"pid {first.pid} on host {os.uname().nodename}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=240) == 0, reader.text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / "final" / "model_index.json").is_file() and (out / "TRAINING_COMPLETE.json").is_file()
    assert [m["step"] for m in _metrics(out) if "loss" in m] == list(range(1, 41))


def test_kill9_never_leaves_a_stale_lock(shared_workspace, tmp_path):
    out = tmp_path / "out"
    env = cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="40", SANA_VALIDATION_STEPS="0")
    proc = start_cli(env)
    reader = Reader(proc)
    assert reader.wait_for("held-out eval loss at step 0", timeout=240), reader.text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_cli(env)
    assert again.returncode == 0, again.stderr[-3000:]


# ---------------------------------------------------------------- metrics.jsonl


def test_metrics_are_appended_on_resume_and_never_duplicated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval_loss": 2.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 13)]
    lines.insert(9, {"step": 8, "eval_loss": 1.5})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 13, "lo')  # killed mid-write
    inode = path.stat().st_ino
    prefix = path.read_bytes()[: len("".join(json.dumps(x) + "\n" for x in lines[:10]))]

    tracker = JsonlTracker(path, resume_step=8)
    tracker.log(8, {"eval_loss": 1.5})  # the resumed run's start eval: already there
    tracker.log(9, {"loss": 0.5})
    tracker.close()
    assert path.stat().st_ino == inode and path.read_bytes().startswith(prefix)  # cut in place, not rewritten
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["step"], sorted(x)) for x in got] == [(x["step"], sorted(x)) for x in lines[:10]] + [(9, ["loss", "step"])]


def test_an_unreadable_marker_or_file_is_damage_not_a_crash(tmp_path):
    for step in (1, 2):
        save_dummy(tmp_path, step)
    marker = tmp_path / "checkpoint-2" / checkpoints.MARKER
    doc = json.loads(marker.read_text())
    doc["files"]["transformer.safetensors"] = {"size": 3}  # a mangled entry: no "bytes"
    marker.write_text(json.dumps(doc))
    assert checkpoints.find_resume("latest", tmp_path).step == 1
    assert "unreadable" in (tmp_path / "checkpoint-2.damaged" / "DAMAGED.json").read_text()


def _rewrite_state(checkpoint: Path, change) -> None:
    """Edit trainer_state.json and re-seal the marker, as a checkpoint written that way would be."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    change(state)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    marker = json.loads((checkpoint / checkpoints.MARKER).read_text())
    marker["files"] = checkpoints._manifest(checkpoint)
    (checkpoint / checkpoints.MARKER).write_text(json.dumps(marker))


def test_resume_refuses_another_base_model_or_a_step_past_the_end(demo_run, tmp_path):
    reference, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "TRAINING_COMPLETE.json").unlink()
    env = cli_env(reference.parent, out)
    shorter = run_cli({**env, "SANA_MAX_TRAIN_STEPS": "8"})
    assert shorter.returncode == 2, shorter.stderr[-3000:]
    assert "past max_train_steps=8" in shorter.stderr and "Traceback" not in shorter.stderr

    _rewrite_state(out / "checkpoints" / "checkpoint-16", lambda s: s["model"].update(version="v0"))
    other = run_cli(env)
    assert other.returncode == 2, other.stderr[-3000:]
    assert "the base model changed since the checkpoint (builtin:tiny-sana@v0 -> builtin:tiny-sana@" in other.stderr
    assert "Traceback" not in other.stderr
    assert (out / "checkpoints" / "checkpoint-16").is_dir()  # refused, not taken for damage


def test_resume_false_means_start_fresh_everywhere(tmp_path):
    from sana_appliance.run import runinfo

    cfg = dataclasses.replace(TrainConfig(), resume_from_checkpoint="none")
    runinfo.mark_complete(tmp_path, cfg, 10)
    for setting in ("none", "false", "False"):
        assert runinfo.completed_step(tmp_path, dataclasses.replace(cfg, resume_from_checkpoint=setting)) is None
        assert checkpoints.find_resume(setting, tmp_path) is None
    assert runinfo.completed_step(tmp_path, dataclasses.replace(cfg, resume_from_checkpoint="latest")) == 10


def test_fresh_start_sets_the_earlier_run_aside_and_changes_are_recorded(shared_workspace, tmp_path):
    """resume_from_checkpoint=none in a used folder moves the earlier run aside (nothing deleted,
    never resumed later); run.json and the model card list what changed at each resume."""
    out = tmp_path / "out"
    base = {"SANA_CHECKPOINTING_STEPS": "4", "SANA_VALIDATION_STEPS": "0", "SANA_USE_EMA": "false"}
    assert run_cli(cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="8", **base)).returncode == 0
    fresh = run_cli(cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="4", SANA_RESUME_FROM_CHECKPOINT="none", **base))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    aside = list((out / "previous-runs").iterdir())
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "checkpoint-8" / checkpoints.MARKER).is_file()
    assert (aside[0] / "final" / "model_index.json").is_file() and "were moved to" in fresh.stderr
    assert [m["step"] for m in _metrics(out) if "loss" in m] == [1, 2, 3, 4]

    later = run_cli(cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="6", SANA_LEARNING_RATE="5e-4", **base))
    assert later.returncode == 0, later.stderr[-3000:]
    assert "resumed from checkpoint-4" in later.stderr  # this run's own checkpoint, not the set-aside checkpoint-8
    history = json.loads((out / "run.json").read_text())["resume_history"]
    assert history == [{"step": 4, "changed": {"learning_rate": [0.001, 0.0005], "max_train_steps": [4, 6]}}]
    assert "resumed at step 4: `learning_rate` 0.001 -> 0.0005" in (out / "final" / "README.md").read_text()
