"""Metrics: metrics.jsonl always; the trackers of :data:`TRACKERS` when report_to asks.

Trackers share one tiny interface, so the training loop never branches on them.
Only rank 0 creates real trackers; other ranks get `NullTracker`. :data:`TRACKERS` is the one
table of optional trackers: ``report_to``'s choices (``none``, each name, ``all``: config.schema) and the
config check of each come from it. Adding one is one entry (and its test).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
    """Event files in output/tensorboard. On resume at step s, events the interrupted run wrote past s are
    purged (SummaryWriter's purge_step), and what the resumed run measures again at s is not written twice."""

    def __init__(self, logdir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self._resume_step = resume_step
        self._writer = SummaryWriter(log_dir=str(logdir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict) -> None:
        if self._resume_step and step <= self._resume_step:
            return  # the interrupted run logged this step; metrics.jsonl keeps the re-measurement
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: dict) -> None:
        import numpy as np

        if self._resume_step and step <= self._resume_step:
            return

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


@dataclass(frozen=True)
class TrackerContext:
    """What a tracker is built from."""

    cfg: Any
    output_dir: Path
    config_dict: dict  # the redacted config, for trackers that record it
    run_id: str | None  # the tracker run id an interrupted run recorded (resumed, not duplicated)
    wandb_mode: str | None  # WANDB_MODE from the environment
    resume_step: int = 0  # the step a resumed run continues from (0: a fresh run)


@dataclass(frozen=True)
class TrackerSpec:
    """One optional tracker: the entry of :data:`TRACKERS`."""

    name: str
    doc: str
    build: Callable[[TrackerContext], NullTracker]
    folder: str | None = None  # what it writes under output_dir (set aside with the run's other outputs)
    # (credentials, hub settings) -> why it cannot run, or None; checked with the config
    problem: Callable[[Any, Any], str | None] = lambda credentials, hub: None


def _wandb_problem(credentials, hub) -> str | None:
    if not credentials.wandb_api_key and hub.wandb_mode not in ("offline", "disabled"):
        return "wandb needs WANDB_API_KEY in the environment (or WANDB_MODE=offline)"
    return None


TRACKERS: dict[str, TrackerSpec] = {spec.name: spec for spec in (
    TrackerSpec("wandb", "Weights & Biases: WANDB_API_KEY, WANDB_MODE",
                lambda c: WandbTracker(c.cfg.tracker_project_name, c.cfg.tracker_run_name, c.config_dict, c.run_id,
                                       c.output_dir, c.wandb_mode),
                problem=_wandb_problem, folder="wandb"),
    TrackerSpec("tensorboard", "TensorBoard event files in output/tensorboard",
                lambda c: TensorBoardTracker(c.output_dir / "tensorboard", c.resume_step), folder="tensorboard"),
)}


def selected(report_to: str) -> list[str]:
    """The tracker names a report_to value asks for, in table order."""
    if report_to == "all":
        return list(TRACKERS)
    return [name for name in TRACKERS if name == report_to]


def build(cfg, output_dir: Path, config_dict: dict, resume_step: int, run_id: str | None, wandb_mode: str | None,
          is_main: bool) -> NullTracker:
    if not is_main:
        return NullTracker()
    trackers: list[NullTracker] = [JsonlTracker(output_dir / "metrics.jsonl", resume_step)]
    context = TrackerContext(cfg, output_dir, config_dict, run_id, wandb_mode, resume_step)
    for name in selected(cfg.report_to):
        trackers.append(TRACKERS[name].build(context))
    return Trackers(trackers)
