"""Config resolution: precedence, provenance, conversion, every error path, presets, CLI.

Run: pytest tests/test_config.py  (no model, ~5 s; subprocess tests make it longer on a busy machine)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sana_appliance.cli import main
from sana_appliance.config import presets
from sana_appliance.config.resolve import CliArgs, resolve
from sana_appliance.config.schema import TrainConfig, fields
from sana_appliance.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"WORKSPACE": str(tmp_path), **extra}


def problems_of(exc: pytest.ExceptionInfo) -> str:
    return "\n".join(exc.value.problems)


# ---------------------------------------------------------------- precedence and provenance


def test_precedence_default_preset_file_env_cli(tmp_path):
    cfg_file = tmp_path / "my.yaml"
    cfg_file.write_text("learning_rate: 2.0e-5\ntrain_batch_size: 3\nseed: 7\nvalidation_steps: 11\n")
    env = env_for(tmp_path, PRESET="24g", CONFIG_PATH=str(cfg_file), SANA_TRAIN_BATCH_SIZE="5", SANA_SEED="8")
    r = resolve(env, CliArgs(overrides=[("seed", "9")]))
    c, p = r.config, r.provenance
    assert (c.model_family, p["model_family"]) == ("sana", "default")
    assert (c.gradient_checkpointing, p["gradient_checkpointing"]) == (True, "preset:24g")
    assert (c.learning_rate, p["learning_rate"]) == (2e-5, f"file:{cfg_file}")
    assert (c.validation_steps, p["validation_steps"]) == (11, f"file:{cfg_file}")
    assert (c.train_batch_size, p["train_batch_size"]) == (5, "env:SANA_TRAIN_BATCH_SIZE")
    assert (c.seed, p["seed"]) == (9, "cli")
    assert r.preset == "24g" and not r.demo_fallback


def test_every_key_settable_from_env_and_typed(tmp_path):
    samples = {bool: ("true", True), int: ("3", 3), float: ("0.5", 0.5), str: ("x", "x")}
    from sana_appliance.config.schema import field_type

    for f in fields():
        base, _ = field_type(f)
        raw, want = samples[base]
        if "choices" in f.metadata:
            raw = want = f.metadata["choices"][-1]
        if f.name in ("ema_decay", "caption_dropout_probability", "adam_beta1", "adam_beta2"):
            raw, want = "0.5", 0.5
        if f.name == "rendezvous_timeout_s":
            raw, want = "30", 30.0
        special = {"base_model_precision": "no_change", "validation_resolution": "512x768", "resume_from_checkpoint": "none"}
        if f.name in special:
            raw = want = special[f.name]
        env = env_for(Path("/nonexistent-ws"), **{f"SANA_{f.name.upper()}": raw})
        if f.name == "report_to":
            env["WANDB_MODE"] = "offline"
        if f.name in ("push_to_hub", "push_checkpoints_to_hub"):
            env.update(HF_TOKEN="hf_x", SANA_HUB_MODEL_ID="me/model")
        if f.name == "gradient_checkpointing_interval":
            env["SANA_GRADIENT_CHECKPOINTING"] = "true"
        if f.name.startswith("lora_") or f.name == "lycoris_config":  # adapter keys act with model_type lora
            env["SANA_MODEL_TYPE"] = "lora"
            if f.name == "lycoris_config":
                env["SANA_LORA_TYPE"] = "lycoris"
        if f.name == "push_checkpoints_to_hub":
            with pytest.raises(ConfigError, match="push_checkpoints_to_hub=True .*needs push_to_hub: true"):
                resolve(env)  # checkpoints go to the repo the final model goes to
            env["SANA_PUSH_TO_HUB"] = "true"
        r = resolve(env)
        got = getattr(r.config, f.name)
        if f.name in ("output_dir", "data_backend_config", "user_prompt_library", "lycoris_config"):
            assert got.endswith(raw), (f.name, got)
        else:
            assert got == want and type(got) is type(want), (f.name, got)
        assert r.provenance[f.name] == f"env:SANA_{f.name.upper()}"


def test_env_aliases_and_workspace_paths(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text("[]")
    r = resolve(env_for(tmp_path, PRESET="24g", OUTPUT_DIR="runs/a"))
    assert r.config.output_dir == str(tmp_path / "runs" / "a")
    assert r.provenance["output_dir"] == "env:OUTPUT_DIR"
    assert r.config.data_backend_config == str(tmp_path / "config" / "multidatabackend.json")
    assert r.provenance["data_backend_config"].startswith("default")
    assert r.workspace.hf_home == tmp_path / "cache" / "huggingface"
    r2 = resolve(env_for(tmp_path, PRESET="24g", HF_HOME="/elsewhere/hf", DATALOADER_CONFIG="/data/mdb.json"))
    assert r2.workspace.hf_home == Path("/elsewhere/hf")
    assert r2.config.data_backend_config == "/data/mdb.json"


def test_workspace_config_file_is_found_and_no_demo(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({"--max_train_steps": 12}))
    r = resolve(env_for(tmp_path))
    assert r.config_path == tmp_path / "config" / "config.json"
    assert r.preset is None and not r.demo_fallback
    assert r.config.max_train_steps == 12


def test_no_preset_no_file_means_demo(tmp_path):
    r = resolve(env_for(tmp_path))
    assert r.demo_fallback and r.preset == "demo"
    assert r.config.pretrained_model_name_or_path == "builtin:tiny-sana"
    assert r.provenance["pretrained_model_name_or_path"] == "preset:demo"


# ---------------------------------------------------------------- SimpleTuner compatibility


def test_simpletuner_config_json_loads_with_types(tmp_path):
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({
        "--learning_rate": 1e-5, "--use_ema": "false", "--gradient_checkpointing": "true",
        "--validation_num_inference_steps": "20", "--max_train_steps": "1000", "--model_type": "full",
        "--model_family": "sana", "--optimizer": "adamw_bf16", "--validation_guidance_rescale": "0.0",
        "--disable_benchmark": "false", "--resolution": 1024, "--resolution_type": "pixel_area",
        "--push_to_hub": False, "--report_to": "none", "--seed": 42, "--checkpoints_total_limit": 5,
    }))
    r = resolve(env_for(tmp_path, CONFIG_PATH=str(cfg_file)))
    c = r.config
    assert c.learning_rate == 1e-5 and isinstance(c.learning_rate, float)
    assert c.use_ema is False
    assert c.gradient_checkpointing is True
    assert c.validation_num_inference_steps == 20 and c.max_train_steps == 1000
    assert c.optimizer == "optimi-adamw"
    # Ignored SimpleTuner keys are reported, not fatal.
    assert any("validation_guidance_rescale" in w for w in r.warnings)
    assert any("resolution" in w and "dataloader" in w for w in r.warnings)


def test_string_false_is_honoured_everywhere(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text('use_ema: "false"\ngradient_checkpointing: "False"\n')
    r = resolve(env_for(tmp_path, PRESET="demo", CONFIG_PATH=str(cfg_file)))
    assert r.config.use_ema is False and r.config.gradient_checkpointing is False
    assert resolve(env_for(tmp_path, PRESET="24g", SANA_GRADIENT_CHECKPOINTING="false")).config.gradient_checkpointing is False


def test_shipped_seed_guide_sana_example_loads(tmp_path):
    """SimpleTuner's own Sana example config (LoRA keys ignored except model_type)."""
    cfg = {
        "base_model_precision": "no_change", "caption_dropout_probability": 0.1, "checkpointing_steps": 50,
        "compress_disk_cache": True, "gradient_checkpointing_interval": 1, "flow_schedule_shift": 3,
        "gradient_checkpointing": True, "learning_rate": 2e-5, "lr_scheduler": "constant_with_warmup",
        "max_grad_norm": 1, "mixed_precision": "bf16", "model_family": "sana", "model_type": "full",
        "optimizer": "adamw_bf16", "pretrained_model_name_or_path": "terminusresearch/sana-1.6b-1024px",
        "quantize_via": "cpu", "validation_resolution": "1024x1024", "validation_seed": 42, "use_ema": True,
        "resume_from_checkpoint": "latest", "num_train_epochs": 0, "max_train_steps": 100,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = resolve(env_for(tmp_path, CONFIG_PATH=str(path)))
    assert r.config.flow_schedule_shift == 3.0 and r.config.max_grad_norm == 1.0


# ---------------------------------------------------------------- errors


def test_bad_env_number_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, SANA_LEARNING_RATE="abc"))
    text = problems_of(exc)
    assert "SANA_LEARNING_RATE" in text and "learning_rate" in text and "1e-5" in text
    assert exc.value.exit_code == 2


def test_unknown_key_suggests_closest(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rat": 1e-5}))
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(path)))
    assert "learning_rat" in problems_of(exc) and "did you mean `learning_rate`" in problems_of(exc)
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, SANA_TRAIN_BATCH_SIZ="2"))
    assert "SANA_TRAIN_BATCH_SIZ" in problems_of(exc) and "train_batch_size" in problems_of(exc)


def test_all_problems_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: -1\nema_decay: 2\ntrain_batch_size: 0\nbogus_key: 1\nmixed_precision: fp8\n")
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(path), SANA_SEED="1.5"))
    text = problems_of(exc)
    for needle in ("learning_rate=-1", "must be > 0", "ema_decay=2", "train_batch_size=0", "bogus_key",
                   "mixed_precision='fp8'", "bf16, fp16, no", "SANA_SEED"):
        assert needle in text, needle
    assert len(exc.value.problems) >= 6


def test_nf4_full_rank_is_refused_with_pointer(tmp_path):
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24g", SANA_BASE_MODEL_PRECISION="nf4-bnb"))
    text = problems_of(exc)
    assert "base_model_precision='nf4-bnb'" in text and "cannot be trained" in text and "lowest-vram" in text


def test_simpletuner_lora_keys_are_read_not_ignored(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"--model_type": "lora", "--lora_type": "lycoris", "--lycoris_config": "config/l.json",
                                "--base_model_precision": "nf4-bnb"}))
    r = resolve(env_for(tmp_path, CONFIG_PATH=str(path)))
    assert (r.config.model_type, r.config.lora_type, r.config.base_model_precision) == ("lora", "lycoris", "nf4-bnb")
    assert r.config.lycoris_config == str(tmp_path / "config" / "l.json")  # relative paths resolve in the workspace
    assert not any("lycoris" in w or "lora" in w for w in r.warnings)


def test_cross_field_rules(tmp_path):
    cases = [
        ({"SANA_PUSH_TO_HUB": "true"}, "hub_model_id"),
        ({"SANA_PUSH_TO_HUB": "true", "SANA_HUB_MODEL_ID": "me/x"}, "HF_TOKEN"),
        ({"SANA_REPORT_TO": "wandb"}, "WANDB_API_KEY"),
        ({"SANA_VALIDATION_RESOLUTION": "10x"}, "validation_resolution"),
        ({"SANA_MAX_TRAIN_STEPS": "0"}, "num_train_epochs"),
        ({"SANA_GRADIENT_CHECKPOINTING_INTERVAL": "2", "SANA_GRADIENT_CHECKPOINTING": "false"}, "gradient_checkpointing"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError) as exc:
            resolve(env_for(tmp_path, PRESET="24g", **extra))
        assert needle in problems_of(exc), (extra, problems_of(exc))


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(tmp_path / "missing.yaml")))
    assert "does not exist" in problems_of(exc)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(broken)))
    assert "not valid JSON" in problems_of(exc)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(listy)))
    assert "mapping" in problems_of(exc)
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24gb"))
    assert "did you mean `24g`" in problems_of(exc)


def test_secrets_never_in_config_or_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hub_token": "hf_supersecret123"}))
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(path)))
    assert "hf_supersecret123" not in str(exc.value) and "HF_TOKEN" in str(exc.value)
    env = env_for(tmp_path, PRESET="24g", HF_TOKEN="hf_plantedtoken999", SANA_HUB_MODEL_ID="me/hf_plantedtoken999")
    r = resolve(env)
    assert r.credentials.hf_token == "hf_plantedtoken999"
    assert "hf_plantedtoken999" not in json.dumps(r.redacted())
    assert "hf_plantedtoken999" not in repr(r)


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["demo", "lowest-vram", "lowest-vram-lokr", "24g", "multi-gpu"])
def test_every_preset_resolves_and_documents_itself(tmp_path, name):
    preset = presets.load(name)
    header = preset.path.read_text().splitlines()[:4]
    assert header[0].startswith("#") and any("docker run" in line for line in preset.path.read_text().splitlines()[:6])
    assert preset.description and preset.hardware and preset.memory
    r = resolve(env_for(tmp_path, PRESET=name))
    assert isinstance(r.config, TrainConfig)
    assert all(r.provenance[k] == f"preset:{name}" for k in preset.values)


def test_lowest_vram_lokr_is_the_guides_table(tmp_path):
    c = resolve(env_for(tmp_path, PRESET="lowest-vram-lokr")).config
    assert (c.model_type, c.lora_type, c.base_model_precision, c.quantize_via) == ("lora", "lycoris", "nf4-bnb", "cpu")
    assert c.optimizer == "bnb-lion8bit-paged" and c.learning_rate == 2e-5  # the guide: 2e-5 for LoKr with Lion
    assert c.train_batch_size == 1 and c.gradient_accumulation_steps == 1 and c.gradient_checkpointing
    assert c.validation_resolution == "1024x1024" and c.mixed_precision == "bf16"
    assert "lowest-vram" in presets.load("lowest-vram-lokr").choose


def test_lowest_vram_is_true_full_rank(tmp_path):
    c = resolve(env_for(tmp_path, PRESET="lowest-vram")).config
    assert c.model_type == "full" and c.base_model_precision == "no_change"
    assert c.optimizer.startswith("bnb-lion8bit") and c.gradient_checkpointing and c.train_batch_size == 1
    assert c.mixed_precision == "bf16" and c.text_encoder_1_precision == "nf4-bnb"


# ---------------------------------------------------------------- CLI


def test_cli_config_prints_every_key_with_source(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    monkeypatch.setenv("PRESET", "24g")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for f in fields():
        assert any(line.startswith(f.name + " ") and "# " in line for line in out.splitlines()), f.name
    assert "# preset:24g" in out and "# default" in out
    assert not (tmp_path / "output").exists()  # no side effects
    assert main(["config", "--json", "--set", "seed=3", "--learning_rate=3e-5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["keys"]["seed"] == {"value": 3, "source": "cli"}
    assert doc["keys"]["learning_rate"]["value"] == 3e-5


def test_cli_exit_code_2_on_bad_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORKSPACE", str(tmp_path))
    monkeypatch.setenv("SANA_LEARNING_RATE", "abc")
    assert main(["config"]) == 2
    assert "SANA_LEARNING_RATE" in capsys.readouterr().err
    assert main(["config", "--set", "nokey"]) == 2


def test_entrypoint_and_console_script_agree(tmp_path):
    env = {**os.environ, "WORKSPACE": str(tmp_path), "PRESET": "24g"}
    env.pop("SANA_LEARNING_RATE", None)
    a = subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), "presets"], capture_output=True, text=True, env=env)
    b = subprocess.run([sys.executable, "-m", "sana_appliance", "presets"], capture_output=True, text=True, env=env)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    for name in ("demo", "lowest-vram", "lowest-vram-lokr", "24g", "multi-gpu"):
        assert name in a.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), "config"], capture_output=True, text=True,
                         env={**env, "SANA_LEARNING_RATE": "abc"})
    assert bad.returncode == 2 and "SANA_LEARNING_RATE" in bad.stderr


def test_readme_documents_every_key_and_env_var():
    readme = (ROOT / "README.md").read_text()
    for f in fields():
        assert f"`{f.name}`" in readme, f.name
    for var in ("PRESET", "WORKSPACE", "CONFIG_PATH", "DATALOADER_CONFIG", "OUTPUT_DIR", "HF_TOKEN", "HF_HOME",
                "HF_ENDPOINT", "HF_HUB_OFFLINE", "WANDB_API_KEY", "WANDB_MODE", "SANA_<KEY>"):
        assert f"`{var}`" in readme, var
    for name in presets.available():
        assert f"`{name}`" in readme, name
    for module in sorted((ROOT / "sana_appliance").glob("*.py")):  # the file map is kept true
        if module.name not in ("__init__.py", "__main__.py"):
            assert f"`sana_appliance/{module.name}`" in readme, module.name


def test_multi_gpu_preset_launches_one_process_per_gpu(tmp_path):
    c = resolve(env_for(tmp_path, PRESET="multi-gpu")).config
    assert c.num_processes == 0
    import torch

    from sana_appliance.distributed.launch import process_count

    assert [process_count(c.num_processes, visible_gpus=n) for n in (0, 1, 2, 8)] == [1, 1, 2, 8]
    assert process_count(3, visible_gpus=8) == 3 and process_count(1, visible_gpus=8) == 1
    assert process_count(c.num_processes) == max(1, torch.cuda.device_count())  # this machine's own count


# ---------------------------------------------------------------- config files read as written


def test_key_given_twice_is_an_error_naming_both_spellings(tmp_path):
    cases = [
        ("c.json", json.dumps({"--learning_rate": 1e-5, "learning_rate": 2e-5}), ("`--learning_rate`", "`learning_rate`")),
        ("c.yaml", "max-train-steps: 5\nseed: 1\nmax_train_steps: 6\n",
         ("`max-train-steps` (line 1)", "`max_train_steps` (line 3)")),
        ("d.yaml", "seed: 1\nseed: 2\n", ("`seed` (line 1)", "`seed` (line 2)")),
        ("d.json", '{"seed": 1, "seed": 2}', ("`seed` is given twice",)),
    ]
    for name, text, needles in cases:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            resolve(env_for(tmp_path, CONFIG_PATH=str(path)))
        assert all(n in problems_of(exc) for n in needles), (name, problems_of(exc))
        assert "keep one" in problems_of(exc)
    from sana_appliance.cli import parse_args

    _, cli = parse_args(["config", "--max-train-steps=3", "--set", "max_train_steps=4"])
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24g"), cli)
    assert "`max_train_steps` is given twice on the command line" in problems_of(exc)
    assert "as `max_train_steps` and `max-train-steps`" in problems_of(exc)  # --set pairs come first
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24g", OUTPUT_DIR="runs/a", SANA_OUTPUT_DIR="runs/b"))
    assert "OUTPUT_DIR and SANA_OUTPUT_DIR" in problems_of(exc)
    same = resolve(env_for(tmp_path, PRESET="24g", OUTPUT_DIR="runs/a", SANA_OUTPUT_DIR="runs/a"))
    assert same.config.output_dir == str(tmp_path / "runs" / "a")


def test_yaml_11_words_are_read_as_written_for_text_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "mixed_precision: no\nrevision: 0123\nvalidation_prompt: yes\ntracker_run_name: on\n"
        "validation_negative_prompt: 'off'\nuse_ema: yes\ngradient_checkpointing: off\nhub_model_id: ~\n"
        "sana_complex_human_instruction: off\nvalidation_steps: 0\ncheckpointing_steps: 0500\nseed: 1_000\n")
    c = resolve(env_for(tmp_path, PRESET="24g", CONFIG_PATH=str(path))).config
    assert c.mixed_precision == "no" and c.revision == "0123"
    assert (c.validation_prompt, c.tracker_run_name, c.validation_negative_prompt) == ("yes", "on", "off")
    assert c.use_ema is True and c.gradient_checkpointing is False and c.hub_model_id is None
    assert c.sana_complex_human_instruction == "disabled"  # a switch word, not the instruction text "off"
    assert c.checkpointing_steps == 500 and c.seed == 1000  # decimal as written, not YAML 1.1's octal
    path.write_text("mixed_precision: fp8\nlearning_rate: no\n")
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, CONFIG_PATH=str(path)))
    assert "learning_rate='no'" in problems_of(exc)  # the word the user wrote, not False


def test_simpletuner_config_env_is_read_as_key_value_lines(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"--learning_rate": 1e-5, "--seed": 3}))
    (folder / "config.env").write_text(
        "# SimpleTuner launcher settings\nTRAINING_NUM_PROCESSES=2\nTRAINING_NUM_MACHINES=1\n"
        "export TRAINING_DYNAMO_BACKEND='inductor'\nCONFIG_BACKEND=json\nSANA_LEARNING_RATE=\"3e-5\"  # faster\n"
        "SANA_SEED=4\nPRESET=24g\nNCCL_P2P_DISABLE=1\n")
    env = env_for(tmp_path, CONFIG_PATH=str(folder / "config.json"), SANA_SEED="5")
    r = resolve(env)
    assert r.env_file == folder / "config.env" and r.preset == "24g"
    assert (r.config.num_processes, r.provenance["num_processes"]) == (2, "config.env:TRAINING_NUM_PROCESSES")
    assert (r.config.learning_rate, r.provenance["learning_rate"]) == (3e-5, "config.env:SANA_LEARNING_RATE")
    assert (r.config.seed, r.provenance["seed"]) == (5, "env:SANA_SEED")  # the real environment wins
    text = "\n".join(r.warnings)
    assert "TRAINING_DYNAMO_BACKEND has no effect" in text and "CONFIG_BACKEND has no effect" in text
    assert "NCCL_P2P_DISABLE is not applied" in text and "TRAINING_NUM_MACHINES" not in text


def test_config_env_refuses_what_it_cannot_honour(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.env").write_text(
        "HF_TOKEN=hf_plantedInEnvFile123\nHF_HUB_OFFLINE=1\nsource ./more.sh\nSANA_SEED=$SEED\n"
        "TRAINING_NUM_MACHINES=2\nSANA_SEED=7\n")
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24g"))
    text = str(exc.value)
    for needle in ("line 1: HF_TOKEN: secrets are never read", "line 2: HF_HUB_OFFLINE: set HF_HUB_OFFLINE in the",
                   "line 3 is not a KEY=VALUE line", "line 4: SANA_SEED: the value uses shell expansion",
                   "line 5: TRAINING_NUM_MACHINES='2'", "line 6: SANA_SEED is given twice"):
        assert needle in text, needle
    assert "hf_plantedInEnvFile123" not in text


def test_validation_resolution_sides_are_multiples_of_32_with_the_nearest_suggested(tmp_path):
    cases = {"1000": "e.g. 992 or 1024", "1000x600,512": "e.g. 992x608,512", "16": "e.g. 32"}
    for value, suggestion in cases.items():
        with pytest.raises(ConfigError) as exc:
            resolve(env_for(tmp_path, PRESET="24g", SANA_VALIDATION_RESOLUTION=value))
        assert f"validation_resolution='{value}' (from env:SANA_VALIDATION_RESOLUTION): sides must be multiples " \
               f"of 32, {suggestion}" in problems_of(exc)
    assert resolve(env_for(tmp_path, PRESET="24g", SANA_VALIDATION_RESOLUTION="1024x1024,1280x768,512"))


def test_push_to_hub_is_refused_offline(tmp_path):
    env = env_for(tmp_path, PRESET="24g", SANA_PUSH_TO_HUB="true", SANA_HUB_MODEL_ID="me/x", HF_TOKEN="hf_x",
                  HF_HUB_OFFLINE="1")
    with pytest.raises(ConfigError) as exc:
        resolve(env)
    assert "push_to_hub=True (from env:SANA_PUSH_TO_HUB): cannot upload while HF_HUB_OFFLINE is set" in problems_of(exc)
    del env["HF_HUB_OFFLINE"]
    assert resolve(env).config.push_to_hub is True


def test_cross_field_rules_run_even_with_single_key_errors(tmp_path):
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24g", SANA_LEARNING_RATE="abc", SANA_PUSH_TO_HUB="true",
                        SANA_VALIDATION_RESOLUTION="1000"))
    text = problems_of(exc)
    assert "SANA_LEARNING_RATE" in text and "needs hub_model_id" in text and "multiples of 32" in text


def test_demo_preset_with_workspace_dataloader_config_says_which_it_uses(tmp_path, caplog):
    (tmp_path / "config").mkdir()
    mine = tmp_path / "config" / "multidatabackend.json"
    mine.write_text("[]")
    r = resolve(env_for(tmp_path, PRESET="demo"))
    assert r.config.data_backend_config == "builtin:demo-shapes"
    [warning] = [w for w in r.warnings if str(mine) in w]
    assert "builtin:demo-shapes (from preset:demo)" in warning and "DATALOADER_CONFIG" in warning
    from sana_appliance.cli import _log_config_summary

    with caplog.at_level("INFO", logger="sana_appliance"):
        _log_config_summary(resolve(env_for(tmp_path, PRESET="24g")))
    assert f"dataset config: {mine}  [default (found in workspace)]" in caplog.text


def test_workspace_prompt_library_is_found_like_the_dataloader_config(tmp_path):
    (tmp_path / "config").mkdir()
    library = tmp_path / "config" / "user_prompt_library.json"
    library.write_text(json.dumps({"cat": "a cat on a sofa"}))
    r = resolve(env_for(tmp_path, PRESET="24g"))
    assert r.config.user_prompt_library == str(library)
    assert r.provenance["user_prompt_library"] == "default (found in workspace)"


def test_validation_resolution_has_an_upper_bound_and_long_warmup_warns(tmp_path):
    with pytest.raises(ConfigError, match="at most 4096"):
        resolve(env_for(tmp_path, PRESET="24g", SANA_VALIDATION_RESOLUTION="32768"))
    r = resolve(env_for(tmp_path, PRESET="24g", SANA_MAX_TRAIN_STEPS="10", SANA_LR_WARMUP_STEPS="50"))
    assert any("never reaches learning_rate" in w for w in r.warnings)


def test_simpletuner_model_card_private_is_hub_private(tmp_path):
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({"model_card_private": False, "push_to_hub_background": True}))
    r = resolve(env_for(tmp_path, CONFIG_PATH=str(cfg_file)))
    assert r.config.hub_private is False and r.provenance["hub_private"] == f"file:{cfg_file}"
    assert any("`model_card_private`" in w and "SimpleTuner's name for `hub_private`" in w for w in r.warnings)
    assert any("`push_to_hub_background`" in w and "always run in the background" in w for w in r.warnings)
    assert resolve(env_for(tmp_path)).config.hub_private is True  # private unless asked otherwise
