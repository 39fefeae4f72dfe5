"""Two real training processes on CPU (gloo): the appliance's own launcher, shared caches,
rank-0 outputs, and a SIGTERM that every rank obeys before resuming.

Run: pytest tests/test_multiprocess.py   (~1 minute on 2 cores)
"""

from __future__ import annotations

import json
import signal

from conftest import cli_env, run_cli, start_cli
from test_checkpoints import Reader

from sana_appliance import checkpoints


def test_two_processes_train_stop_and_resume(shared_workspace, tmp_path):
    out = tmp_path / "out"
    env = cli_env(shared_workspace, out, SANA_NUM_PROCESSES="2", SANA_MAX_TRAIN_STEPS="12", SANA_CHECKPOINTING_STEPS="4",
                  SANA_VALIDATION_STEPS="0")
    proc = start_cli(env)
    reader = Reader(proc)
    if not reader.wait_for("saved checkpoint-4", timeout=150):
        proc.kill()
        raise AssertionError(reader.text()[-5000:])
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both ranks
    assert proc.wait(timeout=120) == 143, reader.text()[-3000:]
    log = reader.text()
    assert "launched 2 training processes" in log
    valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
    assert valid and not invalid
    _, objects, state = checkpoints.load(valid[-1])
    assert state["world_size"] == 2 and {"rng_rank0", "rng_rank1"} <= objects.keys()

    done = run_cli(env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from checkpoint-{valid[-1].step}" in done.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 13))
    # Only rank 0 writes outputs; both ranks trained the same replicated weights.
    assert (out / "final" / "model_index.json").is_file() and (out / "run.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 for r in rows if "loss" in r)
