"""Atomic writes: build in a temp place beside the target, fsync, rename. One copy of each idiom:
:func:`atomic_path` for a file, :func:`atomic_folder` for a folder.

A reader (or a restarted run) sees either the old file or folder or the complete new one,
never a half-written one, whatever kills the process in between.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (deepest first), then `path` itself."""
    entries = sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for entry in entries:
        if entry.is_file() or entry.is_dir():
            fsync_path(entry)
    fsync_path(path)


def make_readable(root: Path) -> None:
    """Folders 0755, files 0644 under `root`: temp-file writers (ours, safetensors') leave 0600/0700,
    and outputs must be readable by whoever mounts the volume."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(dest: Path, *, existing: str = "replace",
                  is_complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build the folder `dest` in a temp sibling (yielded), then put it in place with a rename.

    The body fills the yielded folder. On success every file and folder in it is made readable
    (0644/0755) and fsynced, it is renamed onto `dest` and the parent is fsynced. On any failure
    (or a stop) the temp folder is removed and `dest` is as it was.

    ``existing``: what happens to a `dest` already there:
    - ``"replace"``: it is moved aside with one rename, the new folder renamed in, then the old
      one deleted (only between the two renames is there no `dest`; an aside folder a crash left
      there is deleted by the next replace);
    - ``"keep"``: a complete one (``is_complete(dest)``, required) is kept and ours discarded:
      another process built the same thing first. An incomplete one, left by a tool or a person
      (ours only ever appear complete, by rename), is removed and replaced.
    """
    if existing not in ("replace", "keep"):
        raise ValueError(f"existing must be 'replace' or 'keep', got {existing!r}")
    if existing == "keep" and is_complete is None:
        raise ValueError("existing='keep' needs is_complete")
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        make_readable(tmp)
        fsync_tree(tmp)
        if existing == "keep":
            if dest.exists():  # checked once: a folder of ours appears complete, in one rename
                if is_complete(dest):
                    return
                shutil.rmtree(dest)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not is_complete(dest):  # not another process's complete copy, renamed in meanwhile
                    raise
                return
        else:
            for leftover in parent.glob(f".{dest.name}.old-*.tmp"):  # from a crash between two renames
                shutil.rmtree(leftover, ignore_errors=True)
            aside = None
            if dest.exists():
                aside = parent / f".{dest.name}.old-{os.getpid()}.tmp"
                os.replace(dest, aside)
            os.replace(tmp, dest)
            if aside is not None:
                fsync_path(parent)
                shutil.rmtree(aside, ignore_errors=True)
        fsync_path(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle


def atomic_write_json(path: Path, obj: Any, **dump_kwargs: Any) -> None:
    with atomic_open(path) as handle:
        json.dump(obj, handle, **dump_kwargs)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Same tensors and metadata, same bytes: safetensors writes `__metadata__` in hash-map order, which
    differs between processes, so the header is rewritten with the metadata keys sorted."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        if metadata and len(metadata) > 1:
            canonical_safetensors_header(tmp)


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's header with `__metadata__` first and its keys sorted (the tensor entries keep
    safetensors' own, deterministic order). The data offsets are relative to the end of the header, so only the
    header changes; it is padded with spaces to a multiple of 8, as safetensors pads it."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        if len(raw) == length:  # the usual case: same text, another order
            handle.seek(8)
            handle.write(raw)
            return
        handle.seek(8 + length)
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw + data)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (truncated, garbled header, trailing bytes), or None.
    Reads only the header: cheap enough to check a folder of weights before trusting it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= size - 8:
                return f"{path.name}: not a safetensors file, or truncated"
            header = json.loads(handle.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"{path.name}: unreadable ({type(exc).__name__})"
    described = 8 + header_len + max(ends, default=0)
    if described != size:
        return f"{path.name}: {size} bytes, its header describes {described} (truncated?)"
    return None

