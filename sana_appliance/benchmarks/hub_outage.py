"""Step rate with Hub uploads on during a Hub outage, against uploads off; then whether everything arrives.

    python -m sana_appliance.benchmarks.hub_outage              # 900-step demo runs, a 150 s outage
    python -m sana_appliance.benchmarks.hub_outage --quick      # smoke test (seconds)

Runs the real appliance (the CLI, in a fresh process each time) on the demo three times in one workspace:
uploads off, uploads on (push_to_hub and push_checkpoints_to_hub) against a local Hub that answers
HTTP 503 to every request from just after the start-up checks until `--outage-s` has passed (and the
uploads were refused at least 3 times), and
uploads off again. The step rate is the training loop's samples/s (metrics.jsonl's last line: every step
of the run, checkpoint saves included). Validation is off, so nothing but the uploads differs. After the
outage the run must finish with exit 0 and every checkpoint, the final pipeline and the run's records on
the Hub, byte for byte.

The local Hub is the test suite's (tests/hubserver.py), so this runs from a clone of the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import write_json

ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "alice/sana-outage"  # the local Hub's write tokens belong to alice
TOKEN = "hf_benchmarkTOKEN000000000000000000"


def _fake_hub():
    tests = ROOT / "tests"
    if not (tests / "hubserver.py").is_file():
        raise SystemExit(f"this benchmark needs the local Hub of the test suite ({tests / 'hubserver.py'}): run it "
                         "from a clone of the repository")
    sys.path.insert(0, str(tests))
    from hubserver import FakeHub

    return FakeHub


def _env(workspace: Path, output: Path, steps: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANA_") and k not in ("PRESET", "CONFIG_PATH")}
    env.update(WORKSPACE=str(workspace), OUTPUT_DIR=str(output), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", SANA_MAX_TRAIN_STEPS=str(steps),
               SANA_CHECKPOINTING_STEPS=str(max(1, steps // 6)), SANA_VALIDATION_STEPS="0",
               SANA_DATALOADER_NUM_WORKERS="0")
    env.update(extra)
    return env


def _rate(output: Path) -> float:
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if "samples_per_s" in x][-1]["samples_per_s"]


def _run(env: dict[str, str]) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "entrypoint.py")], env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _missing_on_hub(files: dict[str, bytes], output: Path) -> list[str]:
    missing = []
    for folder in sorted((output / "checkpoints").glob("checkpoint-*")):
        state = json.loads((folder / "trainer_state.json").read_text())
        prefix = f"checkpoints/{state['config_hash']}/{state['run_id']}/{folder.name}/"
        missing += [prefix + p.name for p in folder.iterdir() if p.is_file() and files.get(prefix + p.name) != p.read_bytes()]
    final = output / "final"
    missing += [p.relative_to(final).as_posix() for p in final.rglob("*")
                if p.is_file() and files.get(p.relative_to(final).as_posix()) != p.read_bytes()]
    if files.get("run/metrics.jsonl") != (output / "metrics.jsonl").read_bytes():
        missing.append("run/metrics.jsonl")
    return missing


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=900, help="training steps per run (default 900)")
    parser.add_argument("--outage-s", type=float, default=150.0, help="seconds the Hub answers 503 (default 150)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 24 steps, a 3 s outage")
    parser.add_argument("--workspace", type=Path, help="workspace to reuse (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    steps, outage_s = (24, 3.0) if args.quick else (args.steps, args.outage_s)
    FakeHub = _fake_hub()
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="sana-outage-"))
    results: dict = {"steps": steps, "outage_s": outage_s, "runs": {}}

    def off(name: str) -> None:
        output = workspace / f"out-bench-{name.replace(' ', '-')}"
        code, log, wall = _run(_env(workspace, output, steps))
        if code != 0:
            raise SystemExit(f"the uploads-off run failed (exit {code}):\n{log[-3000:]}")
        results["runs"][name] = {"samples_per_s": _rate(output), "wall_s": round(wall, 1)}
        print(f"{name:<28} {results['runs'][name]['samples_per_s']:8.2f} samples/s  ({wall:.0f} s wall)", flush=True)

    off("uploads off")
    with FakeHub() as hub:
        hub.write_tokens.add(TOKEN)
        output = workspace / "out-bench-uploads-on"
        env = _env(workspace, output, steps, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN,
                   HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", SANA_PUSH_TO_HUB="true",
                   SANA_PUSH_CHECKPOINTS_TO_HUB="true", SANA_HUB_MODEL_ID=REPO_ID, SANA_HUB_RETRY_WINDOW_S="60",
                   SANA_HUB_UPLOAD_WAIT_S=str(max(600.0, 4 * outage_s)))
        outage: dict = {}

        def start_outage() -> None:  # after the start-up checks (whoami, repo, checkpoints to resume)
            deadline = time.monotonic() + 600
            # the preflight's repo lookup, then the look for checkpoints to resume: both before any upload
            while hub.hits("GET", f"/api/models/{REPO_ID}") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            hub.outage(503)
            outage["start"] = time.monotonic()
            refused_from = hub.hits()
            # At least outage_s, and until the uploads have been refused a few times (a short outage could
            # otherwise end before the first checkpoint is queued).
            while (time.monotonic() - outage["start"] < outage_s or hub.hits() - refused_from < 3) and \
                    time.monotonic() - outage["start"] < outage_s + 600:
                time.sleep(0.1)
            hub.end_outage()
            outage["end"] = time.monotonic()

        thread = threading.Thread(target=start_outage, daemon=True)
        thread.start()
        code, log, wall = _run(env)
        thread.join(timeout=outage_s + 60)
        if code != 0:
            raise SystemExit(f"the uploads-on run failed (exit {code}):\n{log[-3000:]}")
        failed_requests = sum(1 for line in log.splitlines() if "Hub upload of" in line and "retrying in" in line)
        missing = _missing_on_hub(dict(hub.repos[("model", REPO_ID)].files), output)
        trained_during_outage = "start" in outage
        results["runs"]["uploads on, Hub outage"] = {
            "samples_per_s": _rate(output), "wall_s": round(wall, 1), "upload_retries_logged": failed_requests,
            "missing_on_hub": missing, "outage_started": trained_during_outage}
        print(f"{'uploads on, Hub outage':<28} {_rate(output):8.2f} samples/s  ({wall:.0f} s wall; "
              f"{failed_requests} upload retries logged; {len(missing)} file(s) missing on the Hub after recovery)",
              flush=True)
    off("uploads off again")
    rates = results["runs"]
    baseline = (rates["uploads off"]["samples_per_s"] + rates["uploads off again"]["samples_per_s"]) / 2
    on = rates["uploads on, Hub outage"]["samples_per_s"]
    results["slowdown_pct"] = round(100.0 * (baseline - on) / baseline, 2)
    results["everything_uploaded"] = not rates["uploads on, Hub outage"]["missing_on_hub"]
    print(f"uploads on during the outage: {on / baseline:.3f}x the uploads-off rate ({results['slowdown_pct']:+.1f}% "
          f"slower; target: at most 5% slower); everything on the Hub after recovery: {results['everything_uploaded']}")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
