"""Preflight: the config checks that look at the disk, run by the CLI before any download or launch.

:func:`resolve.resolve` is pure (values, layers, provenance); what needs the file system lives
here: the output folder must be writable (tried with a probe file, removed at once), must not
lie inside a dataset folder or a cache, the dataloader config must parse, and the user prompt
library must parse (its nickname renames are reported). The ``config`` verb runs it too, so
`sana-appliance config` finds these problems without training; its only side effect is the
probe file. Problems join resolve's in one ConfigError (exit 2).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config.prompts import load_prompt_set
from ..config.resolve import Resolved
from ..config.schema import BUILTIN_DATASET
from ..core.errors import ConfigError
from ..data.backends import Backend, TextEmbedsBackend, load_data_config, parse_data_config

PROBE_PREFIX = ".sana-appliance-write-probe-"


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)  # each stops the run (exit 2)
    notes: list[str] = field(default_factory=list)  # reported, not fatal


def check(resolved: Resolved, *, training: bool) -> Findings:
    """Every disk-facing config check; ``training`` makes a missing dataloader config an error."""
    found = Findings()
    cfg, where = resolved.config, resolved.provenance
    output = Path(cfg.output_dir)
    head = f"output_dir={cfg.output_dir!r} (from {where['output_dir']})"
    why = unwritable(output)
    if why:
        found.problems.append(f"{head}: {why}; mount the volume writable (no `:ro`), give the trainer's user "
                              "write access, or set OUTPUT_DIR to a writable folder")
    backends, text = _data_config(resolved, training, found)
    found.problems.extend(_output_location(head, output, resolved, backends, text))
    if training and cfg.text_encoder_1_precision == "nf4-bnb":
        from ..model.parts import import_bitsandbytes_for_nf4

        try:
            import_bitsandbytes_for_nf4()
        except ConfigError as exc:
            found.problems.extend(exc.problems)
    if cfg.model_type == "lora":  # the LyCORIS config read and checked, the packages loaded, before any download
        from ..model import adapters

        try:
            adapters.check(cfg)
        except ConfigError as exc:
            found.problems.extend(exc.problems)
    if cfg.compile_transformer:
        missing = compile_toolchain_missing()
        if missing:
            found.problems.append(f"compile_transformer=true (from {where['compile_transformer']}): torch.compile "
                                  f"builds its kernels with a C/C++ compiler and the Python headers, and this machine "
                                  f"lacks {', '.join(missing)}: install them (Debian/Ubuntu: apt-get install gcc "
                                  "g++ python3-dev) or set compile_transformer: false")
    if cfg.user_prompt_library:
        try:
            found.notes.extend(load_prompt_set(cfg, where["user_prompt_library"]).renamed)
        except ConfigError as exc:
            found.problems.extend(exc.problems)
        if not cfg.validation_steps:
            found.notes.append("user_prompt_library has no effect: validation_steps is 0 (validation disabled)")
    return found


def compile_toolchain_missing() -> list[str]:
    """What torch.compile needs here and this machine lacks: on a GPU a C compiler (Triton builds its
    launchers), on the CPU a C++ compiler (inductor's kernels), and Python.h for both."""
    import shutil
    import sysconfig

    import torch

    missing = []
    if torch.cuda.is_available():
        if not any(shutil.which(c) for c in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang"))):
            missing.append("a C compiler (gcc)")
    elif not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++"))):
        missing.append("a C++ compiler (g++)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append(f"the Python headers ({sysconfig.get_paths()['include']}/Python.h)")
    return missing


def unwritable(path: Path) -> str | None:
    """Why no file can be made at `path` (or in the folder it will be created in); None if one can."""
    existing = path
    # os.path (unlike Path.exists) answers False instead of raising inside a folder we may not enter.
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a broken symbolic link"
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:  # permission bits do not tell (read-only mounts, ACLs, root squash): try it
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as exc:
        return f"cannot create a file in {existing} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


def _data_config(resolved: Resolved, training: bool,
                 found: Findings) -> tuple[list[Backend], TextEmbedsBackend | None]:
    spec, workspace = resolved.config.data_backend_config, resolved.workspace
    if spec is None:
        message = (f"data_backend_config is not set and {workspace.config_dir / 'multidatabackend.json'} does not "
                   "exist: put your SimpleTuner multidatabackend.json there, or set DATALOADER_CONFIG=path/to/it "
                   "(README: Training your own data)")
        (found.problems if training else found.notes).append(message)
        return [], None
    try:
        if spec == BUILTIN_DATASET:  # its entries, without generating the images (no side effects here)
            from ..data.demo import demo_config_entries

            return parse_data_config(demo_config_entries(workspace), BUILTIN_DATASET, workspace)
        return load_data_config(spec, workspace)
    except ConfigError as exc:
        found.problems.extend(exc.problems)
        return [], None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or path.is_relative_to(folder)


def _output_location(head: str, output: Path, resolved: Resolved, backends: list[Backend],
                     text: TextEmbedsBackend | None) -> list[str]:
    problems = []
    for backend in backends:
        if _inside(output, backend.instance_data_dir):
            problems.append(
                f"{head} lies inside dataset `{backend.id}`'s folder {backend.instance_data_dir}: validation images "
                "would be read as training images on the next run; put output_dir outside every dataset folder "
                "(the default is output/ in the workspace)")
    caches = [("the cache folder", resolved.workspace.cache_dir)]
    caches += [(f"dataset `{b.id}`'s cache_dir_vae", b.cache_dir_vae) for b in backends]
    caches += [(f"the text-embed cache `{text.id}`", text.cache_dir)] if text is not None else []
    for label, folder in caches:
        if _inside(output, folder):
            problems.append(
                f"{head} lies inside {label} {folder}: clearing the cache would delete checkpoints and the "
                "final model; put output_dir outside it (the default is output/ in the workspace)")
            break
    return problems
