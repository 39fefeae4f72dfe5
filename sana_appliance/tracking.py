"""Metrics: metrics.jsonl always; TensorBoard and wandb when report_to asks.

Trackers share one tiny interface, so the training loop never branches on them.
Only rank 0 creates real trackers; other ranks get `NullTracker`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("sana_appliance.tracking")


class NullTracker:
    run_id: str | None = None

    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_images(self, step: int, images: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(NullTracker):
    """Appends one JSON line per logged step. The file is only ever appended to or cut short.

    On resume at step s the lines past s (steps the interrupted run logged after its last
    checkpoint, and a half-written last line from a kill) are cut off in place, and a line
    the resumed run logs again at step s (its start eval loss) is not written twice: the
    file holds each logged step once, in order.
    """

    def __init__(self, path: Path, resume_step: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._at_resume: set[tuple[int, frozenset]] = set()
        self._resume_step = resume_step
        keep = 0
        if path.exists():
            with open(path, "rb") as handle:
                for raw in handle:
                    try:
                        line = json.loads(raw) if raw.endswith(b"\n") else None
                    except ValueError:
                        line = None
                    if not isinstance(line, dict) or line.get("step", 0) > resume_step:
                        break
                    if line.get("step", 0) == resume_step:
                        self._at_resume.add(self._key(line))
                    keep += len(raw)
            if keep < path.stat().st_size:
                log.info("metrics.jsonl: dropping %d bytes logged after step %d (superseded by this resumed run)",
                         path.stat().st_size - keep, resume_step)
                os.truncate(path, keep)
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def _key(line: dict) -> tuple[int, frozenset]:
        return line.get("step", 0), frozenset(k for k in line if k != "step")

    def log(self, step: int, metrics: dict) -> None:
        line = {"step": step, **metrics}
        if step == self._resume_step and self._key(line) in self._at_resume:
            return  # already in the file from before the interruption
        self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardTracker(NullTracker):
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(logdir))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: dict) -> None:
        import numpy as np

        for name, image in images.items():
            self._writer.add_image(f"validation/{name}", np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


class WandbTracker(NullTracker):
    def __init__(self, project: str, run_name: str | None, config: dict, run_id: str | None, directory: Path, mode: str | None):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=project, name=run_name, config=config, id=run_id, resume="allow",
                               dir=str(directory), mode=mode or None)
        self.run_id = self._run.id

    def log(self, step: int, metrics: dict) -> None:
        self._run.log(metrics, step=step)

    def log_images(self, step: int, images: dict) -> None:
        self._run.log({f"validation/{k}": self._wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers(NullTracker):
    def __init__(self, trackers: list[NullTracker]):
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.run_id), None)

    def log(self, step: int, metrics: dict) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def log_images(self, step: int, images: dict) -> None:
        for t in self.trackers:
            t.log_images(step, images)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def build(cfg, output_dir: Path, config_dict: dict, resume_step: int, run_id: str | None, wandb_mode: str | None, is_main: bool) -> NullTracker:
    if not is_main:
        return NullTracker()
    trackers: list[NullTracker] = [JsonlTracker(output_dir / "metrics.jsonl", resume_step)]
    if cfg.report_to in ("tensorboard", "all"):
        trackers.append(TensorBoardTracker(output_dir / "tensorboard"))
    if cfg.report_to in ("wandb", "all"):
        trackers.append(WandbTracker(cfg.tracker_project_name, cfg.tracker_run_name, config_dict, run_id, output_dir, wandb_mode))
    return Trackers(trackers)
