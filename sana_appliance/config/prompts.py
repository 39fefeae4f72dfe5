"""Validation prompts: validation_prompt plus the user prompt library, under unique file names.

Each prompt's nickname becomes part of its PNG names (``step0000500_<nickname>_1024x1024.png``).
Nicknames are made file-safe, and any two that would name the same file (``a/b`` and ``a_b``,
``Cat`` and ``cat`` on a case-insensitive volume, a library entry called ``validation``, the
same nickname twice in the JSON) get ``_2``, ``_3``... in library order: no prompt is ever
dropped, and each rename is reported. Parsed at config time (the CLI's preflight), so a
broken library fails before any download; torch-free for that reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError

PRIMARY_NICKNAME = "validation"
# Room for step, resolution and suffixes within a file system's 255-byte name limit.
MAX_NICKNAME_CHARS = 80


@dataclass(frozen=True)
class PromptSet:
    prompts: dict[str, str]  # unique file-safe nickname -> prompt, primary first
    renamed: tuple[str, ...] = ()  # one line per library entry whose file name differs from its nickname


class _Pairs(list):
    """A JSON object as (key, value) pairs, so a nickname given twice is kept, not overwritten."""


def file_safe(nickname: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nickname).strip("_.")[:MAX_NICKNAME_CHARS].strip("_.")
    return safe or "prompt"


def read_library(path: Path, head: str) -> list[tuple[str, str]]:
    """(nickname, prompt) entries of a prompt library file, in file order (raises ConfigError).

    ``head`` starts every message: the key, its value and where it came from.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_Pairs)
    except FileNotFoundError:
        raise ConfigError(f"{head}: {path} does not exist; create it or remove the setting") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{head}: {path} cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{head}: not valid JSON ({exc}); expected {{\"nickname\": \"prompt\", ...}}") from None
    if not isinstance(data, _Pairs):
        raise ConfigError(f"{head}: must be a JSON object of nickname -> prompt text, found a {type(data).__name__}")
    problems = []
    for nickname, prompt in data:
        if not isinstance(prompt, str):
            kind = "an object" if isinstance(prompt, _Pairs) else type(prompt).__name__
            problems.append(f"{head}: entry {nickname!r}: the prompt must be text, found {kind}; "
                            f"write it as \"{nickname}\": \"a photo of ...\"")
        elif not prompt.strip():
            problems.append(f"{head}: entry {nickname!r}: the prompt is empty; write the prompt text or remove the entry")
    if problems:
        raise ConfigError(problems)
    return [(nickname, prompt) for nickname, prompt in data]


def unique_prompts(primary: str | None, entries: list[tuple[str, str]]) -> PromptSet:
    """Give every prompt a file name of its own; the primary prompt keeps `validation`."""
    prompts: dict[str, str] = {}
    taken: dict[str, str] = {}  # casefolded file name -> the nickname holding it
    renamed = []
    if primary:
        prompts[PRIMARY_NICKNAME] = primary
        taken[PRIMARY_NICKNAME] = "validation_prompt"
    for nickname, prompt in entries:
        base = file_safe(nickname)
        name, counter = base, 2
        while name.casefold() in taken:
            name, counter = f"{base}_{counter}", counter + 1
        if name != nickname:
            holder = taken.get(base.casefold())
            clash = "" if holder is None else " (the nickname appears twice in the library)" if holder == nickname \
                else f" ({base!r} is taken by {holder!r})"
            renamed.append(f"user_prompt_library entry {nickname!r} is saved as {name!r}{clash}")
        taken[name.casefold()] = nickname
        prompts[name] = prompt
    return PromptSet(prompts, tuple(renamed))


def load_prompt_set(cfg, source: str | None = None) -> PromptSet:
    """validation_prompt (nickname `validation`) plus the user prompt library of a resolved config."""
    entries = []
    if cfg.user_prompt_library:
        head = f"user_prompt_library={cfg.user_prompt_library!r}" + (f" (from {source})" if source else "")
        entries = read_library(Path(cfg.user_prompt_library), head)
    return unique_prompts(cfg.validation_prompt, entries)
