"""The dataloader config (SimpleTuner's multidatabackend.json): parse, validate, convert.

A pipeline like the main config's: read the JSON list, convert every value to its
field's type (``"true"``/``"false"`` strings are booleans, numeric strings are
numbers), validate each dataset entry and collect every problem, then complete
defaults and absolute paths. Problems are reported together as one ConfigError
naming the file, the dataset id and the field.

Discovery of the files themselves (and the resulting :class:`DataPlan`) lives in
:mod:`sana_appliance.data.plan` (above this module: plan imports backends, never the reverse).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.schema import BUILTIN_DATASET, defaults
from ..core.errors import AssetError, ConfigError
from ..core.parsing import ParseError, is_none_word, to_bool, to_int, to_number
from ..core.workspace import Workspace

log = logging.getLogger(__name__)

RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
CROP_ASPECTS = ("square", "preserve", "closest", "random")
CROP_STYLES = ("center", "centre", "random", "corner")
CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt")


@dataclass(frozen=True)
class Backend:
    """One image dataset entry of multidatabackend.json, converted and validated."""

    id: str
    type: str  # a name of BACKEND_TYPES: local | huggingface
    instance_data_dir: Path  # absolute; for huggingface, where the download lands
    caption_strategy: str  # filename | textfile | instanceprompt
    instance_prompt: str | None
    resolution: float
    resolution_type: str  # pixel (short side px) | area (megapixels) | pixel_area (side of equal-area square)
    minimum_image_size: float  # same unit as resolution; smaller images are skipped
    maximum_image_size: float | None  # crop=true: larger images are first downsampled...
    target_downsample_size: float | None  # ...to this size, then cropped
    crop: bool
    crop_aspect: str  # square | preserve | closest | random
    crop_style: str  # center | random | corner
    repeats: int  # extra passes per epoch: 0 = each image once per epoch
    probability: float  # relative weight when interleaving datasets' batches
    is_regularisation_data: bool
    cache_dir_vae: Path  # absolute
    crop_aspect_buckets: tuple[float, ...] = ()  # aspects for crop_aspect closest | random
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    disable_multiline_split: bool = False
    max_num_samples: int | None = None  # deterministic subset, seeded by the id
    hf_dataset_name: str | None = None  # type huggingface: the Hub dataset repo id
    hf_revision: str = "main"
    source: str = ""  # the config file, for messages


@dataclass(frozen=True)
class TextEmbedsBackend:
    id: str
    cache_dir: Path  # absolute
    write_batch_size: int


# ---------------------------------------------------------------- backend types


@dataclass(frozen=True)
class BackendType:
    """One dataset backend type (an entry's `type`): the entry of :data:`BACKEND_TYPES`."""

    name: str
    # (entry, where, workspace, problems) -> (instance_data_dir, hub dataset name or None), or None when unusable
    locate: Callable[[dict, str, Workspace, list[str]], tuple[Path, str | None] | None]
    # bring the files into instance_data_dir before the scan; returns the commit it fetched, if any
    fetch: Callable[[Backend, Any, Any], str | None] | None = None
    folder_exists_before_run: bool = True  # a missing instance_data_dir is an error before any download


def _local_folder(v: dict, where: str, workspace: Workspace, problems: list[str]) -> tuple[Path, None] | None:
    if not v.get("instance_data_dir"):
        problems.append(f"{where}: instance_data_dir is required, e.g. \"instance_data_dir\": \"datasets/my-images\"")
        return None
    return workspace.resolve(v["instance_data_dir"]), None


def _hub_folder(v: dict, where: str, workspace: Workspace, problems: list[str]) -> tuple[Path, str]:
    hf_name = v.get("dataset_name")
    if not hf_name:
        problems.append(f"{where}: type huggingface needs dataset_name, e.g. \"dataset_name\": \"user/my-images\"")
        hf_name = "missing"
    data_dir = workspace.resolve(v["instance_data_dir"]) if v.get("instance_data_dir") else (
        workspace.datasets_dir / hf_name.replace("/", "--")
    )
    return data_dir, hf_name


def _fetch_hub_dataset(backend: Backend, hub: Any, credentials: Any) -> str | None:
    try:
        from ..hub.download import fetch_dataset
    except ImportError as exc:
        raise AssetError(
            f"dataset `{backend.id}` is type huggingface ({backend.hf_dataset_name}) but this build cannot "
            f"download datasets ({exc}); download it into {backend.instance_data_dir} and use type local"
        ) from None
    result = fetch_dataset(
        backend.hf_dataset_name, backend.hf_revision, dest=backend.instance_data_dir, hub=hub, credentials=credentials
    )
    if isinstance(result, tuple) and len(result) == 2:
        return str(result[1])
    return None


BACKEND_TYPES: dict[str, BackendType] = {spec.name: spec for spec in (
    # a folder of images (and captions) under the workspace or any mounted path
    BackendType("local", _local_folder),
    # a Hugging Face Hub dataset repo (dataset_name, revision), downloaded into instance_data_dir
    # (default datasets/<owner>--<name>)
    BackendType("huggingface", _hub_folder, fetch=_fetch_hub_dataset, folder_exists_before_run=False),
)}


# Fields per entry kind -> converter. Converters raise _Bad with a rule text.
class _Bad(Exception):
    pass


def _parsed(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A core.parsing converter whose ParseError becomes this module's _Bad."""
    def converter(v: Any) -> Any:
        try:
            return convert(v)
        except ParseError as exc:
            raise _Bad(str(exc)) from None
    return converter


_bool, _number, _int = _parsed(to_bool), _parsed(to_number), _parsed(to_int)


def _opt_number(v: Any) -> float | None:
    return None if is_none_word(v) else _number(v)


def _opt_int(v: Any) -> int | None:
    return None if is_none_word(v) else _int(v)


def _str(v: Any) -> str:
    if isinstance(v, (dict, list, bool)) or v is None:
        raise _Bad("must be a text value")
    return str(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _any(v: Any) -> Any:
    return v


def _aspects(v: Any) -> tuple[float, ...]:
    if not isinstance(v, list) or not v:
        raise _Bad("must be a non-empty list of aspect ratios (width/height), e.g. [0.75, 1.0, 1.33]")
    out = tuple(_number(x) for x in v)
    if any(a <= 0 for a in out):
        raise _Bad("aspect ratios must be > 0")
    return out


_COMMON: dict[str, Callable[[Any], Any]] = {
    "id": _str, "type": _str, "dataset_type": _str, "disabled": _bool, "disable": _bool,
    "skip_file_discovery": _any, "preserve_data_backend_cache": _bool,
}
IMAGE_FIELDS: dict[str, Callable[[Any], Any]] = {
    **_COMMON,
    "instance_data_dir": _str, "caption_strategy": _str, "instance_prompt": _opt_str,
    "resolution": _number, "resolution_type": _str, "minimum_image_size": _opt_number,
    "maximum_image_size": _opt_number, "target_downsample_size": _opt_number,
    "minimum_aspect_ratio": _opt_number, "maximum_aspect_ratio": _opt_number,
    "crop": _bool, "crop_aspect": _str, "crop_style": _str, "crop_aspect_buckets": _aspects,
    "repeats": _int, "probability": _number, "is_regularisation_data": _bool,
    "is_regularization_data": _bool, "cache_dir_vae": _str, "metadata_backend": _str,
    "prepend_instance_prompt": _bool, "only_instance_prompt": _bool, "disable_multiline_split": _bool,
    "max_num_samples": _opt_int, "text_embeds": _opt_str, "dataset_name": _str, "revision": _str,
    "vae_cache_clear_each_epoch": _bool, "hash_filenames": _bool, "scan_for_errors": _bool,
    "delete_unwanted_images": _bool, "delete_problematic_images": _bool,
}
TEXT_FIELDS: dict[str, Callable[[Any], Any]] = {
    **_COMMON, "default": _bool, "cache_dir": _str, "write_batch_size": _int, "text_encoder_batch_size": _int,
}
# Accepted for compatibility, no effect here: why, shown once per file.
NO_EFFECT = {
    "preserve_data_backend_cache": "discovery results are not cached between runs",
    "vae_cache_clear_each_epoch": "random crops are fixed per file (derived from seed + content), so latents stay valid",
    "hash_filenames": "cache files are always named by content hash",
    "scan_for_errors": "every file is checked during discovery",
    "delete_unwanted_images": "the appliance never deletes your files; skipped files are listed in data_report.json",
    "delete_problematic_images": "the appliance never deletes your files; skipped files are listed in data_report.json",
    "text_encoder_batch_size": "the text encoder batch size is set by the trainer",
}
# Known SimpleTuner fields that would change what is trained: refused, not ignored.
UNSUPPORTED = {
    "parquet": "parquet metadata is not supported; keep captions in .txt files (caption_strategy: textfile)",
    "caption_column": "Hub datasets are downloaded as files; use caption_strategy textfile or filename",
    "image_column": "Hub datasets are downloaded as files (images next to .txt captions)",
    "conditioning_data": "conditioning datasets are not supported (full-rank text-to-image only)",
    "conditioning": "conditioning datasets are not supported (full-rank text-to-image only)",
    "caption_shuffle": "caption shuffling is not supported",
    "image_embeds": "latents always go to cache_dir_vae",
    "start_epoch": "dataset scheduling is not supported", "end_epoch": "dataset scheduling is not supported",
    "start_step": "dataset scheduling is not supported", "end_step": "dataset scheduling is not supported",
    "max_upscale_threshold": "not supported; use minimum_image_size to exclude small images",
    "video": "video datasets are not supported",
}


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _cache_path(value: str, entry_id: str, key: str, where: str, workspace: Workspace, problems: list[str]) -> Path:
    """A cache path with SimpleTuner's placeholders filled in: `cache/vae/{model_family}/{id}`.

    Left as text, `{model_family}` would become a folder of that name; an unknown placeholder
    is refused rather than guessed.
    """
    known = {"model_family": defaults()["model_family"], "id": entry_id}
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(value)} - set(known))
    if unknown:
        names = ", ".join(f"{{{n}}}" for n in unknown)
        problems.append(f"{where}: {key}={value!r}: unknown placeholder {names}; only {{model_family}} (sana) and "
                        "{id} (this dataset's id) are filled in: write the rest of the path out")
    filled = _PLACEHOLDER.sub(lambda m: known.get(m.group(1), m.group(0)), value)
    return workspace.resolve(filled)


def _where(source: str, entry_id: str) -> str:
    return f"{source}: dataset `{entry_id}`"


def _unknown(key: str, known: dict[str, Any], where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else f"; known fields: {', '.join(sorted(known))}"
    return f"{where}: unknown field `{key}`{hint}"


def _convert(entry: dict, fields: dict, where: str, problems: list[str]) -> dict:
    out = {}
    for key, raw in entry.items():
        if key in UNSUPPORTED and key not in fields:
            problems.append(f"{where}: field `{key}`: {UNSUPPORTED[key]}")
            continue
        if key not in fields:
            problems.append(_unknown(key, fields, where))
            continue
        try:
            out[key] = fields[key](raw)
        except _Bad as exc:
            problems.append(f"{where}: {key}={raw!r}: {exc}")
    return out


def _check_choice(values: dict, key: str, choices: tuple, default: str, where: str, problems: list[str]) -> str:
    value = str(values.get(key, default)).strip().lower()
    if value not in choices:
        problems.append(f"{where}: {key}={values.get(key)!r}: must be one of {', '.join(choices)}")
        return default
    return value


def _image_backend(v: dict, where: str, source: str, workspace: Workspace, problems: list[str]) -> Backend | None:
    entry_id = v["id"]
    kind = _check_choice(v, "type", tuple(BACKEND_TYPES), "local", where, problems)
    meta = str(v.get("metadata_backend", "discovery")).lower()
    if meta not in ("discovery", "huggingface"):
        problems.append(f"{where}: metadata_backend={meta!r}: only `discovery` is supported (image sizes are read from the files)")
    located = BACKEND_TYPES[kind].locate(v, where, workspace, problems)
    if located is None:
        return None
    data_dir, hf_name = located
    strategy = str(v.get("caption_strategy", "filename")).lower()
    if strategy not in CAPTION_STRATEGIES:
        problems.append(
            f"{where}: caption_strategy={strategy!r}: must be one of {', '.join(CAPTION_STRATEGIES)} "
            "(captions from .txt files next to the images, from file names, or one instance_prompt)"
        )
    prompt = v.get("instance_prompt")
    needs_prompt = strategy == "instanceprompt" or v.get("prepend_instance_prompt") or v.get("only_instance_prompt")
    if needs_prompt and not (prompt and prompt.strip()):
        problems.append(f"{where}: caption_strategy instanceprompt / prepend_instance_prompt / only_instance_prompt need instance_prompt, e.g. \"instance_prompt\": \"a photo of sks dog\"")
    rtype = _check_choice(v, "resolution_type", RESOLUTION_TYPES, "pixel_area", where, problems)
    resolution = v.get("resolution", 1.0 if rtype == "area" else 1024.0)
    if resolution <= 0:
        problems.append(f"{where}: resolution={resolution}: must be > 0, e.g. 1024 (pixel_area) or 1.0 (area)")
    if rtype == "area" and resolution > 64:
        problems.append(f"{where}: resolution={resolution} with resolution_type area means {resolution} megapixels; use resolution_type pixel_area for pixel sizes")
    crop_aspect = _check_choice(v, "crop_aspect", CROP_ASPECTS, "square", where, problems)
    if str(v.get("crop_style", "")).lower() == "face":
        problems.append(f"{where}: crop_style `face` is not supported; use center, random or corner")
        v = {**v, "crop_style": "center"}
    crop_style = _check_choice(v, "crop_style", CROP_STYLES, "center", where, problems).replace("centre", "center")
    buckets = v.get("crop_aspect_buckets", ())
    if v.get("crop") and crop_aspect in ("closest", "random") and not buckets:
        problems.append(f"{where}: crop_aspect {crop_aspect} needs crop_aspect_buckets, e.g. [0.75, 1.0, 1.33]")
    maximum, downsample = v.get("maximum_image_size"), v.get("target_downsample_size")
    if downsample is not None and maximum is None:
        problems.append(f"{where}: target_downsample_size needs maximum_image_size (images above it are downsampled to the target)")
    for key in ("minimum_image_size", "maximum_image_size", "target_downsample_size", "minimum_aspect_ratio", "maximum_aspect_ratio"):
        if v.get(key) is not None and v[key] < 0:
            problems.append(f"{where}: {key}={v[key]}: must be >= 0")
    repeats = v.get("repeats", 0)
    if repeats < 0:
        problems.append(f"{where}: repeats={repeats}: must be >= 0 (0 = each image once per epoch)")
    probability = v.get("probability", 1.0)
    if probability <= 0:
        problems.append(f"{where}: probability={probability}: must be > 0; to leave a dataset out set \"disabled\": true")
    if v.get("max_num_samples") is not None and v["max_num_samples"] < 1:
        problems.append(f"{where}: max_num_samples={v['max_num_samples']}: must be >= 1 or null")
    cache_dir_vae = (_cache_path(v["cache_dir_vae"], entry_id, "cache_dir_vae", where, workspace, problems)
                     if v.get("cache_dir_vae") else workspace.cache_dir / "vae" / entry_id)
    return Backend(
        id=entry_id, type=kind, instance_data_dir=data_dir, caption_strategy=strategy,
        instance_prompt=prompt, resolution=resolution, resolution_type=rtype,
        minimum_image_size=v.get("minimum_image_size") or 0.0, maximum_image_size=maximum or None,
        target_downsample_size=downsample or None, crop=v.get("crop", False), crop_aspect=crop_aspect,
        crop_style=crop_style, repeats=repeats, probability=probability,
        is_regularisation_data=v.get("is_regularisation_data", v.get("is_regularization_data", False)),
        cache_dir_vae=cache_dir_vae, crop_aspect_buckets=tuple(buckets),
        minimum_aspect_ratio=v.get("minimum_aspect_ratio"), maximum_aspect_ratio=v.get("maximum_aspect_ratio"),
        prepend_instance_prompt=v.get("prepend_instance_prompt", False),
        only_instance_prompt=v.get("only_instance_prompt", False),
        disable_multiline_split=v.get("disable_multiline_split", False),
        max_num_samples=v.get("max_num_samples"), hf_dataset_name=hf_name,
        hf_revision=v.get("revision", "main"), source=source,
    )


def parse_data_config(
    entries: Any, source: str, workspace: Workspace
) -> tuple[list[Backend], TextEmbedsBackend]:
    """Validate a parsed multidatabackend list; every problem is reported at once."""
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: must be a JSON list of dataset entries, found a {type(entries).__name__}")
    problems: list[str] = []
    notes: set[str] = set()
    backends: list[Backend] = []
    texts: list[tuple[TextEmbedsBackend, bool]] = []
    seen: set[str] = set()
    image_text_refs: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{source}: entry #{index + 1} must be an object {{...}}, found {type(entry).__name__}")
            continue
        entry_id = str(entry.get("id") or f"#{index + 1}")
        where = _where(source, entry_id)
        if not entry.get("id"):
            problems.append(f"{where}: `id` is required (a short unique name)")
        elif entry_id in seen:
            problems.append(f"{where}: duplicate id; every dataset needs its own id")
        seen.add(entry_id)
        is_text = str(entry.get("dataset_type", "image")).lower() == "text_embeds"
        fields = TEXT_FIELDS if is_text else IMAGE_FIELDS
        if str(entry.get("dataset_type", "image")).lower() not in ("image", "text_embeds"):
            problems.append(f"{where}: dataset_type={entry.get('dataset_type')!r}: only image and text_embeds datasets are supported")
            continue
        try:
            disabled = any(_bool(entry[k]) for k in ("disabled", "disable") if k in entry)
        except _Bad:
            problems.append(f"{where}: disabled={entry.get('disabled', entry.get('disable'))!r}: must be true or false")
            continue
        if disabled:
            continue  # a parked entry is not validated: SimpleTuner ignores it too
        values = _convert(entry, fields, where, problems)
        values["id"] = entry_id
        for key in values:
            if key in NO_EFFECT and entry.get(key) not in (False, None, "false"):
                notes.add(f"{where}: `{key}` has no effect here: {NO_EFFECT[key]}")
        if values.get("skip_file_discovery"):
            notes.add(f"{where}: skip_file_discovery is ignored: files are always scanned (content hashes key the caches)")
        if is_text:
            if str(values.get("type", "local")).lower() != "local":
                problems.append(f"{where}: text_embeds type={values.get('type')!r}: only `local` is supported")
            size = values.get("write_batch_size", 128)
            if size < 1:
                problems.append(f"{where}: write_batch_size={size}: must be >= 1, e.g. 128")
            cache = (_cache_path(values["cache_dir"], entry_id, "cache_dir", where, workspace, problems)
                     if values.get("cache_dir") else workspace.cache_dir / "text" / entry_id)
            texts.append((TextEmbedsBackend(entry_id, cache, size), values.get("default", False)))
        else:
            backend = _image_backend(values, where, source, workspace, problems)
            if backend is not None:
                backends.append(backend)
                if values.get("text_embeds"):
                    image_text_refs.append((where, values["text_embeds"]))
    if not backends and not problems:
        problems.append(f"{source}: no enabled image dataset; add one with instance_data_dir, or set disabled: false")
    text = _choose_text_backend(texts, source, workspace, problems)
    for where, ref in image_text_refs:
        if ref != text.id:
            problems.append(f"{where}: text_embeds={ref!r}: only one text-embed cache is supported, `{text.id}`; remove the field")
    if problems:
        raise ConfigError(problems)
    for note in sorted(notes):
        log.warning(note)
    return backends, text


def _choose_text_backend(
    texts: list[tuple[TextEmbedsBackend, bool]], source: str, workspace: Workspace, problems: list[str]
) -> TextEmbedsBackend:
    if not texts:
        fallback = TextEmbedsBackend("text-embeds", workspace.cache_dir / "text" / "default", 128)
        log.warning("%s: no text_embeds entry; text embeddings go to %s", source, fallback.cache_dir)
        return fallback
    defaults = [t for t, is_default in texts if is_default]
    if len(texts) == 1:
        return texts[0][0]
    if len(defaults) != 1:
        ids = ", ".join(t.id for t, _ in texts)
        problems.append(f"{source}: {len(texts)} text_embeds entries ({ids}); mark exactly one with \"default\": true (only one is used)")
        return texts[0][0]
    return defaults[0]


def load_data_config(spec: str, workspace: Workspace) -> tuple[list[Backend], TextEmbedsBackend]:
    """Read the dataloader config: a file path, or ``builtin:demo-shapes`` (generated on first use)."""
    if spec == BUILTIN_DATASET:
        from . import demo  # generated on first use (imports PIL; the config verb does not need it)

        demo.ensure_demo_dataset(workspace)
        return parse_data_config(demo.demo_config_entries(workspace), BUILTIN_DATASET, workspace)
    if spec.startswith("builtin:"):
        raise ConfigError(f"data_backend_config={spec!r}: unknown built-in dataset; the only one is {BUILTIN_DATASET}")
    path = workspace.resolve(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"data_backend_config: {path} does not exist; create it (see the SimpleTuner multidatabackend.json "
            f"format) or set DATALOADER_CONFIG={BUILTIN_DATASET} for the demo"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data_backend_config: {path} cannot be read: {exc}") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data_backend_config: {path} is not valid JSON: {exc}") from None
    return parse_data_config(entries, str(path), workspace)
