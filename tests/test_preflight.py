"""Preflight: the disk-facing config checks the CLI runs before any download, and prompt nicknames.

Run: OMP_NUM_THREADS=1 pytest tests/test_preflight.py   (no model; ~5 s, most of it importing torch
for the validation module)

Every check goes through the real CLI entry (`main(["config"])`), which must find each problem
without training and report it together with resolve's problems in one exit-2 error.
"""

from __future__ import annotations

import json
import os

import pytest

from sana_appliance.cli import main
from sana_appliance.config.resolve import resolve
from sana_appliance.run.preflight import PROBE_PREFIX

DATA = [{"id": "mine", "type": "local", "instance_data_dir": "datasets/mine", "cache_dir_vae": "vaecache/mine"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "textcache"}]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A workspace with a dataloader config; the environment holds only what a test sets."""
    for name in list(os.environ):
        if name.startswith("SANA_") or name in ("PRESET", "CONFIG_PATH", "OUTPUT_DIR", "DATALOADER_CONFIG",
                                                "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(DATA))
    (tmp_path / "datasets" / "mine").mkdir(parents=True)
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    monkeypatch.setenv("PRESET", "24g")
    return tmp_path


def config_verb(capsys) -> tuple[int, str, str]:
    code = main(["config"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unwritable_output_folder_is_refused_and_the_probe_leaves_nothing(workspace, capsys, monkeypatch):
    code, out, _ = config_verb(capsys)
    assert code == 0, out
    assert not (workspace / "output").exists()  # the probe goes into the nearest existing folder...
    assert not [p for p in workspace.rglob("*") if p.name.startswith(PROBE_PREFIX)]  # ...and is removed
    monkeypatch.setenv("OUTPUT_DIR", "/sys/sana-appliance-out")  # not writable even for root
    code, _, err = config_verb(capsys)
    assert code == 2
    assert "output_dir='/sys/sana-appliance-out' (from env:OUTPUT_DIR): cannot create a file in /sys" in err
    assert "OUTPUT_DIR to a writable folder" in err
    (workspace / "afile").write_text("x")
    monkeypatch.setenv("OUTPUT_DIR", str(workspace / "afile" / "out"))
    code, _, err = config_verb(capsys)
    assert code == 2 and f"{workspace / 'afile'} is a file, not a folder" in err
    (workspace / "dangling").symlink_to(workspace / "gone")
    monkeypatch.setenv("OUTPUT_DIR", str(workspace / "dangling"))
    code, _, err = config_verb(capsys)
    assert code == 2 and f"{workspace / 'dangling'} is a broken symbolic link" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; /sys covers it above")
def test_read_only_output_folder_is_refused(workspace, capsys, monkeypatch):
    locked = workspace / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv("OUTPUT_DIR", str(locked / "out"))
    code, _, err = config_verb(capsys)
    assert code == 2 and f"cannot create a file in {locked}" in err


def test_output_inside_a_dataset_or_a_cache_is_refused(workspace, capsys, monkeypatch):
    cases = {
        "datasets/mine/out": "lies inside dataset `mine`'s folder",
        "datasets/mine": "lies inside dataset `mine`'s folder",
        "cache/runs": "lies inside the cache folder",
        "vaecache/mine/x": "lies inside dataset `mine`'s cache_dir_vae",
        "textcache": "lies inside the text-embed cache `text`",
    }
    for output, needle in cases.items():
        monkeypatch.setenv("OUTPUT_DIR", output)
        code, _, err = config_verb(capsys)
        assert code == 2 and needle in err and f"output_dir='{workspace / output}' (from env:OUTPUT_DIR)" in err, output
    monkeypatch.setenv("OUTPUT_DIR", "datasets/other-out")  # beside the dataset is fine
    assert config_verb(capsys)[0] == 0


def test_prompt_library_is_parsed_at_config_time_and_errors_name_the_entry(workspace, capsys, monkeypatch):
    library = workspace / "config" / "prompts.json"
    library.write_text(json.dumps({"good": "a cat", "bad": ["a", "b"], "blank": "  ", "num": 3}))
    monkeypatch.setenv("SANA_USER_PROMPT_LIBRARY", "config/prompts.json")
    code, _, err = config_verb(capsys)
    assert code == 2
    head = f"user_prompt_library='{library}' (from env:SANA_USER_PROMPT_LIBRARY)"
    assert f"{head}: entry 'bad': the prompt must be text, found list" in err
    assert f"{head}: entry 'blank': the prompt is empty" in err and "entry 'num'" in err and "'good'" not in err
    library.write_text("{nope")
    code, _, err = config_verb(capsys)
    assert code == 2 and "not valid JSON" in err
    library.unlink()
    code, _, err = config_verb(capsys)
    assert code == 2 and f"{library} does not exist" in err


def test_every_problem_is_reported_at_once(workspace, capsys, monkeypatch):
    (workspace / "config" / "prompts.json").write_text(json.dumps({"x": 1}))
    monkeypatch.setenv("SANA_USER_PROMPT_LIBRARY", "config/prompts.json")
    monkeypatch.setenv("SANA_LEARNING_RATE", "abc")  # single key
    monkeypatch.setenv("SANA_VALIDATION_RESOLUTION", "1000")  # cross field
    monkeypatch.setenv("OUTPUT_DIR", "datasets/mine/out")  # preflight
    code, _, err = config_verb(capsys)
    assert code == 2 and "4 configuration errors" in err
    for needle in ("SANA_LEARNING_RATE", "multiples of 32", "lies inside dataset `mine`", "entry 'x'"):
        assert needle in err, needle


def test_train_verb_refuses_a_missing_dataloader_config_together_with_other_problems(workspace, capsys, monkeypatch):
    (workspace / "config" / "multidatabackend.json").unlink()
    monkeypatch.setenv("SANA_LEARNING_RATE", "-1")
    assert main(["config"]) == 2  # the config verb: only the learning rate...
    assert "multidatabackend.json does not exist" not in capsys.readouterr().err
    assert main(["train"]) == 2  # ...training: both, before any model is located
    err = capsys.readouterr().err
    assert "2 configuration errors" in err and "DATALOADER_CONFIG" in err and "learning_rate=-1" in err


def test_nickname_collisions_are_made_unique_never_dropped(workspace, capsys, monkeypatch):
    library = {"a/b": "one", "a_b": "two", "validation": "three", "Cat": "four", "cat": "five", "a_b_2": "six"}
    text = json.dumps(library)[:-1] + ', "Cat": "seven"}'  # the same nickname twice in the file
    (workspace / "config" / "prompts.json").write_text(text)
    monkeypatch.setenv("SANA_USER_PROMPT_LIBRARY", "config/prompts.json")
    monkeypatch.setenv("SANA_VALIDATION_PROMPT", "primary")
    from sana_appliance.run.validation import image_name, load_prompts

    prompts = load_prompts(resolve(dict(os.environ)).config)  # what training renders
    assert sorted(prompts.values()) == sorted(["primary", *library.values(), "seven"])  # nothing dropped
    assert prompts["validation"] == "primary"
    files = {image_name(100, nickname, 64, 64).casefold() for nickname in prompts}
    assert len(files) == len(prompts)  # distinct even on a case-insensitive volume
    assert prompts["a_b"] == "one" and prompts["a_b_2"] == "two" and prompts["validation_2"] == "three"
    assert prompts["a_b_2_2"] == "six" and prompts["cat_2"] == "five" and prompts["Cat_3"] == "seven"
    code, out, _ = config_verb(capsys)
    assert code == 0
    assert "# warning: user_prompt_library entry 'a_b' is saved as 'a_b_2' ('a_b' is taken by 'a/b')" in out
    assert "entry 'Cat' is saved as 'Cat_3' (the nickname appears twice in the library)" in out  # cat_2 is taken


def test_compile_transformer_without_a_compiler_is_refused_with_the_fix(workspace, capsys, monkeypatch, tmp_path):
    """torch.compile builds kernels with a compiler: on a machine without one (here: a PATH with none on it) the
    setting is refused before anything runs, naming what is missing and how to get it; with one it passes."""
    monkeypatch.setenv("SANA_COMPILE_TRANSFORMER", "true")
    code, out, err = config_verb(capsys)
    assert code == 0, err
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    code, _, err = config_verb(capsys)
    assert code == 2
    assert "compile_transformer=true (from env:SANA_COMPILE_TRANSFORMER)" in err and "a C++ compiler (g++)" in err
    assert "apt-get install gcc g++ python3-dev" in err and "compile_transformer: false" in err
