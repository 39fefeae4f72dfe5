"""Stop signals in every phase: setup, caching, a validation round, the final validation,
export, the Hub upload, and several processes under the appliance's launcher, torchrun and
accelerate launch. Real processes, real signals, a real (stalling) HTTP server on 127.0.0.1.

Each test waits for the log line that says its phase started, then signals, so the phase is
known; the slow phases are made slow with config (validation size, steps, prompts).

Run: pytest tests/test_signals.py   (~3 minutes on 2 cores, 5.5 when they are busy; shares the session workspace)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import PLANTED_TOKEN, ROOT, cli_env, run_cli, start_cli
from hubserver import whoami_payload
from safetensors.torch import load_file
from test_checkpoints import Reader

from sana_appliance.run import checkpoints

# Time allowed from the signal to the exit: far inside the smallest documented grace (60 s).
STOP_WITHIN_S = 45


def slow_validation(tmp_path: Path) -> dict[str, str]:
    """Three prompts at 128px x 20 sampler steps: a round of several seconds on CPU, each sampler step ~0.1 s."""
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"square": "a green square on a red background",
                                   "triangle": "a yellow triangle on a blue background"}))
    return {"SANA_VALIDATION_RESOLUTION": "128x128", "SANA_VALIDATION_NUM_INFERENCE_STEPS": "20",
            "SANA_USER_PROMPT_LIBRARY": str(library)}


def signal_on(proc: subprocess.Popen, reader: Reader, needle: str, sig: int, timeout: float = 240) -> None:
    if not reader.wait_for(needle, timeout=timeout) or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"never saw {needle!r} in a running process:\n{reader.text()[-4000:]}")
    proc.send_signal(sig)


def wait_stopped(proc: subprocess.Popen, reader: Reader) -> tuple[int, str]:
    """The exit code and the whole output, once the process exits (at most STOP_WITHIN_S after the signal)."""
    try:
        code = proc.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {STOP_WITHIN_S} s after the signal:\n{reader.text()[-4000:]}")
    log = reader.text()
    assert PLANTED_TOKEN not in log
    return code, log


def images_of_step(out: Path, step: int) -> list[str]:
    return sorted(p.name for p in (out / "validation").glob(f"step{step:07d}_*.png"))


def loss_steps(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


# ---------------------------------------------------------------- one process


def test_stop_during_setup_and_during_caching(tmp_path):
    """Nothing to save yet: exit at once (setup) or at the next cache batch (caching); no checkpoint."""
    workspace = tmp_path / "fresh"  # empty caches: the tiny model is built and every caption encoded
    env = cli_env(workspace, workspace / "out")

    proc = start_cli(env)
    reader = Reader(proc)
    signal_on(proc, reader, "building the built-in tiny Sana", signal.SIGTERM)
    code, log = wait_stopped(proc, reader)
    assert code == 143, log[-3000:]
    assert "stopped by SIGTERM during setup" in log and "Traceback" not in log

    proc = start_cli(env)
    reader = Reader(proc)
    signal_on(proc, reader, "caching text embeddings", signal.SIGTERM)  # logged before the encoder loads
    code, log = wait_stopped(proc, reader)
    assert code == 143, log[-3000:]
    assert "stopped by SIGTERM while filling the caches" in log and "Traceback" not in log
    assert not (workspace / "out" / "checkpoints").exists()
    assert not [p for p in (workspace / "cache").rglob("*.tmp")], "a cache entry was left half-written"


def test_stop_during_validation_then_final_validation_then_finish_without_retraining(shared_workspace, tmp_path):
    out = tmp_path / "out"
    env = cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="8", SANA_CHECKPOINTING_STEPS="8",
                  SANA_VALIDATION_STEPS="4", **slow_validation(tmp_path))

    # 1. Ctrl+C during the round at step 4: the round is abandoned, step 4 (unsaved) is saved.
    proc = start_cli(env)
    reader = Reader(proc)
    signal_on(proc, reader, "validation at step 4: rendering 3 prompt(s)", signal.SIGINT)
    code, log = wait_stopped(proc, reader)
    assert code == 130, log[-3000:]
    assert "validation at step 4 abandoned" in log and "stopped by SIGINT at step 4 after saving checkpoint-4" in log
    assert len(images_of_step(out, 4)) < 3  # not the whole round
    valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
    assert [r.step for r in valid] == [4] and not invalid
    saved = load_file(valid[0].path / "transformer.safetensors")
    ema = load_file(valid[0].path / "ema.safetensors")
    # The training weights were put back after the EMA copy validated: the checkpoint holds them, not the EMA.
    assert any(not torch.equal(saved[k], ema["shadow." + k]) for k in saved)

    # 2. Resume; SIGTERM during the final validation (finish() saved checkpoint-8 before it).
    proc = start_cli(env)
    reader = Reader(proc)
    signal_on(proc, reader, "validation at step 8: rendering", signal.SIGTERM)
    code, log = wait_stopped(proc, reader)
    assert code == 143, log[-3000:]
    assert "resumed from checkpoint-4" in log and "stopped by SIGTERM during the final validation" in log
    assert [r.step for r in checkpoints.list_checkpoints(out / "checkpoints")[0]][-1] == 8
    assert not (out / "final").exists() and not (out / "TRAINING_COMPLETE.json").exists()
    final_ckpt = out / "checkpoints" / "checkpoint-8" / "transformer.safetensors"
    mtime = final_ckpt.stat().st_mtime_ns

    # 3. Restart: validates and exports at step 8 without training or saving again.
    done = run_cli(env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint-8" in done.stderr and "saved checkpoint" not in done.stderr
    assert final_ckpt.stat().st_mtime_ns == mtime
    assert len(images_of_step(out, 8)) == 3 and (out / "final" / "model_index.json").is_file()
    assert json.loads((out / "TRAINING_COMPLETE.json").read_text())["step"] == 8
    assert loss_steps(out) == list(range(1, 9))  # each step trained exactly once over the three starts


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _signal_at(point: int, flag):
    """An export `check` that sends this process a real SIGTERM at the `point`-th call."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == point:
            os.kill(os.getpid(), signal.SIGTERM)
        flag.check()

    return check


def test_export_abandoned_at_any_point_leaves_final_as_it_was(tmp_path):
    """A real SIGTERM arrives between two export files, at every point in turn: final/ is
    absent or the previous export, never a mix, and no temp folder is left."""
    from sana_appliance.distributed.stopping import Abandoned, StopFlag
    from sana_appliance.model import parts as models
    from sana_appliance.run import export

    parts = models.load_parts(models.builtin_model_path(tmp_path / "cache"), "tiny", torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    kwargs = dict(output_dir=out, transformer=parts.transformer, ema_state=None, parts=parts, sample_images=[])
    points = []
    export.export_final(**kwargs, card="first", check=lambda: points.append(1))
    previous = _tree(out / "final")
    assert len(points) > 5  # the text encoder, VAE, tokenizer and scheduler files are copied one by one
    flag = StopFlag().install()
    try:
        for fresh in (True, False):
            if fresh:
                os.replace(out / "final", tmp_path / "kept")
            for at in range(1, len(points) + 1):
                flag.signum = None
                with pytest.raises(Abandoned):
                    export.export_final(**kwargs, card="second", check=_signal_at(at, flag))
                assert flag.signum == signal.SIGTERM
                assert (not (out / "final").exists()) if fresh else _tree(out / "final") == previous
                assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
            if fresh:
                os.replace(tmp_path / "kept", out / "final")
    finally:
        flag.restore()


SIGNALS_REPO = "someone/sana-signals"


class StallingHub(ThreadingHTTPServer):
    """Accepts Hub API calls and answers none until released: an upload that is in progress. The push
    preflight's lookups (whoami: a write token of the repo's owner; the repo: not there yet) and
    huggingface_hub's agent-harness registry are answered at once and not recorded."""

    daemon_threads = True

    def __init__(self):
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _stall(self):
                server.requests.append(f"{self.command} {self.path}")
                server.release.wait(timeout=120)
                with contextlib.suppress(OSError):  # the client is usually gone by then
                    self.send_error(503)

            def _answer(self, status: int, body: object, **headers: str) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/api/whoami-v2":
                    return self._answer(200, whoami_payload(SIGNALS_REPO.split("/")[0]))
                if path == f"/api/models/{SIGNALS_REPO}":
                    return self._answer(404, {"error": "Repository not found"}, **{"X-Error-Code": "RepoNotFound"})
                if path == "/api/agent-harnesses":
                    return self._answer(404, {"error": "not here"})
                return self._stall()

            do_HEAD = do_POST = do_PUT = _stall

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.release.set()
        self.shutdown()
        self.server_close()


def wait_for_requests(hub: StallingHub, count: int, proc, reader, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while len(hub.requests) < count and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    if len(hub.requests) < count:
        proc.kill()
        pytest.fail(f"no upload request reached the Hub server:\n{reader.text()[-4000:]}")


def test_stop_during_upload_exits_143_and_the_next_start_uploads_again(shared_workspace, tmp_path):
    hub = StallingHub()
    out = tmp_path / "out"
    env = cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="4", SANA_CHECKPOINTING_STEPS="4", SANA_VALIDATION_STEPS="0",
                  SANA_PUSH_TO_HUB="true", SANA_HUB_MODEL_ID=SIGNALS_REPO, HF_ENDPOINT=hub.url,
                  HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
    try:
        for attempt in (1, 2):
            proc = start_cli(env)
            reader = Reader(proc)
            wait_for_requests(hub, len(hub.requests) + 1, proc, reader)  # this start's upload has begun
            proc.send_signal(signal.SIGTERM)
            code, log = wait_stopped(proc, reader)
            assert code == 143, log[-3000:]
            assert "stopped by SIGTERM during the Hub upload" in log and "Traceback" not in log
            record = json.loads((out / "TRAINING_COMPLETE.json").read_text())
            assert record["step"] == 4 and record["upload"]["status"] == "pending"  # the upload is still owed
            assert (out / "final" / "model_index.json").is_file()
            if attempt == 2:  # the restart did not train or export again: it went straight to the upload
                assert "without retraining or re-exporting" in log and "saved checkpoint" not in log
                assert "exported the fine-tuned pipeline" not in log
        assert all(" /api/" in r for r in hub.requests), hub.requests  # Hub API calls of the upload, nothing else
    finally:
        hub.close()


# ---------------------------------------------------------------- several processes

# Records each worker's own exit code: torchrun's agent exits 1 when signalled, whatever the
# workers did. The trap keeps bash alive (and waiting) when the agent signals its process group.
RECORD_EXIT = 'trap : TERM INT; "$@"; rc=$?; echo "$RANK $rc" >> "$EXIT_LOG"; exit $rc'


def launcher_command(launcher: str, port: int) -> list[str]:
    worker = ["--no-python" if launcher == "torchrun" else "--no_python", "bash", "-c", RECORD_EXIT, "worker",
              sys.executable, str(ROOT / "entrypoint.py")]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *worker]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *worker]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the launcher's child with RANK=`rank` (Linux /proc)."""
    for tid in os.listdir(f"/proc/{launcher_pid}/task"):
        for pid in Path(f"/proc/{launcher_pid}/task/{tid}/children").read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


@pytest.mark.parametrize("launcher", ["appliance", "appliance-rank1-only", "torchrun", "accelerate"])
def test_sigterm_to_the_launcher_during_validation_stops_every_rank(launcher, shared_workspace, tmp_path):
    """Rank 0 validates while rank 1 waits; SIGTERM to the launcher (or agent), or to rank 1
    alone: the round is abandoned, both ranks save checkpoint-4 together and every worker exits 143."""
    out = tmp_path / "out"
    exit_log = tmp_path / "exits"
    env = cli_env(shared_workspace, out, SANA_MAX_TRAIN_STEPS="8", SANA_CHECKPOINTING_STEPS="8", SANA_VALIDATION_STEPS="4",
                  EXIT_LOG=str(exit_log), **slow_validation(tmp_path))
    if launcher.startswith("appliance"):
        env["SANA_NUM_PROCESSES"] = "2"
        proc = start_cli(env)
    else:
        proc = subprocess.Popen(launcher_command(launcher, free_port()), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    reader = Reader(proc)
    if launcher == "appliance-rank1-only":  # e.g. one node of several preempted: rank 0 hears nothing itself
        if not reader.wait_for("validation at step 4: rendering", timeout=240):
            proc.kill()
            pytest.fail(reader.text()[-4000:])
        os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)
    else:
        signal_on(proc, reader, "validation at step 4: rendering", signal.SIGTERM)
    code, log = wait_stopped(proc, reader)
    assert "validation at step 4 abandoned" in log, log[-4000:]
    assert len(images_of_step(out, 4)) < 3
    valid, invalid = checkpoints.list_checkpoints(out / "checkpoints")
    assert [r.step for r in valid] == [4] and not invalid, log[-4000:]
    assert checkpoints.load(valid[0])[2]["world_size"] == 2
    if launcher.startswith("appliance"):
        assert code == 143, log[-4000:]  # the launcher exits with its workers' code
        assert log.count("stopped by SIGTERM at step 4") == 2  # both ranks, the unsignalled one too
    else:
        workers = sorted(exit_log.read_text().split("\n")[:-1])
        assert workers == ["0 143", "1 143"], log[-4000:]
