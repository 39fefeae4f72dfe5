"""Adapters (model_type: lora): PEFT LoRA and LyCORIS LoKr on the frozen, optionally nf4/int8-quantized tiny Sana.

Run: pytest tests/test_adapters.py   (~2 minutes on 2 cores; demo runs through the real CLI)
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import cli_env, run_cli, start_cli
from safetensors.torch import load_file
from test_checkpoints import Reader
from test_config import env_for, problems_of

from sana_appliance.config.resolve import resolve
from sana_appliance.core.errors import ConfigError
from sana_appliance.hub import upload
from sana_appliance.model import adapters
from sana_appliance.model import parts as models
from sana_appliance.run import checkpoints

LORA = {"SANA_MODEL_TYPE": "lora", "SANA_LORA_RANK": "8", "SANA_LORA_EXPORT_MERGED": "true",
        "SANA_MAX_TRAIN_STEPS": "40", "SANA_CHECKPOINTING_STEPS": "20", "SANA_VALIDATION_STEPS": "20"}
# The guide's lowest-VRAM recipe on the demo: LoKr over an nf4 base quantized on the CPU, bf16 autocast.
LOKR_NF4 = {"SANA_MODEL_TYPE": "lora", "SANA_LORA_TYPE": "lycoris", "SANA_BASE_MODEL_PRECISION": "nf4-bnb",
            "SANA_QUANTIZE_VIA": "cpu", "SANA_MIXED_PRECISION": "bf16", "SANA_MAX_TRAIN_STEPS": "24",
            "SANA_CHECKPOINTING_STEPS": "8", "SANA_VALIDATION_STEPS": "8"}
# Stated tolerance: the LoRA applied by load_lora_weights against the same LoRA merged into the weights (fp32 tiny
# model on the CPU, 4 sampler steps, pixels in [0, 1]). Measured: max |diff| 2e-6; the adapter itself moves pixels
# by up to 0.2.
MERGE_TOLERANCE = 1e-3


def _eval(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["eval_loss"]


@pytest.fixture(scope="module")
def lora_run(shared_workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    done = run_cli(cli_env(shared_workspace, out, **LORA))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="module")
def lokr_reference(shared_workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("lokr") / "out"
    done = run_cli(cli_env(shared_workspace, out, **LOKR_NF4))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def _pipeline_image(pipe, seed: int = 7) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on a blue background", num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                max_sequence_length=48, use_resolution_binning=False, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_lora_trains_only_the_adapter_and_checkpoints_only_it(lora_run, shared_workspace):
    out, done = lora_run
    evals = _eval(out)
    assert evals["end"] < evals["start"] - 0.1, evals  # the held-out eval loss falls
    assert "model_type=lora: LoRA rank 8, alpha 8 on 32 modules" in done.stderr
    valid, _ = checkpoints.list_checkpoints(out / "checkpoints")
    folder = valid[-1].path
    assert not (folder / "transformer.safetensors").exists()
    adapter = load_file(folder / "adapter.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    base = models.builtin_model_path(shared_workspace / "cache")
    base_params = sum(t.numel() for t in load_file(base / "transformer" / "diffusion_pytorch_model.safetensors").values())
    trained = sum(t.numel() for t in adapter.values())
    assert trained == 32 * 8 * (64 + 64) and trained < base_params / 5  # rank 8 on 32 projections of width 64
    ema = load_file(folder / "ema.safetensors")
    assert {k.removeprefix("shadow.") for k in ema} == set(adapter)  # the EMA is the adapter's, nothing else
    assert upload.check_final(out / "final") == [] and upload.ADAPTER_WEIGHTS == adapters.ADAPTER_FILE
    (out / "final" / "merged" / "model_index.json").rename(out / "model_index.json.aside")
    try:  # a damaged merged/ pipeline is found before an upload
        assert any("model_index.json" in p for p in upload.check_final(out / "final"))
    finally:
        (out / "model_index.json.aside").rename(out / "final" / "merged" / "model_index.json")
    card = (out / "final" / "README.md").read_text()
    assert "pipe.load_lora_weights(" in card and "merged/" in card and "tags: [sana, text-to-image, lora" in card
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["model_type"] == "lora" and record["config"]["lora_rank"] == 8


def test_lora_loads_with_load_lora_weights_and_draws_what_the_merged_pipeline_draws(lora_run, shared_workspace):
    from diffusers import SanaPipeline

    out, _ = lora_run
    base = models.builtin_model_path(shared_workspace / "cache")
    pipe = SanaPipeline.from_pretrained(base, dtype=torch.float32)
    plain = _pipeline_image(pipe)
    pipe.load_lora_weights(out / "final")
    with_lora = _pipeline_image(pipe)
    merged = _pipeline_image(SanaPipeline.from_pretrained(out / "final" / "merged", dtype=torch.float32))
    assert np.abs(with_lora - merged).max() < MERGE_TOLERANCE
    assert np.abs(with_lora - plain).max() > 50 * MERGE_TOLERANCE  # the adapter does change the pictures (~0.2)
    # The model card's snippets, pasted as a user would: each draws what the last validation round drew.
    from PIL import Image

    validated = np.asarray(Image.open(out / "validation" / "step0000040_validation_64x64.png"), dtype=np.float32)
    card = (out / "final" / "README.md").read_text()
    blocks = [b.split("```")[0] for b in card.split("```python\n")[1:]]
    assert len(blocks) == 2  # load_lora_weights on the base, and the merged pipeline
    for code in blocks:
        code = code.replace("'PATH_TO_THE_BASE_MODEL_FOLDER'", repr(str(base))).replace(
            "'PATH_OR_REPO'", repr(str(out / "final"))).replace("'PATH/merged'", repr(str(out / "final" / "merged")))
        scope: dict = {}
        exec(code, scope)  # noqa: S102
        drawn = np.asarray(scope["image"], dtype=np.float32)
        assert np.abs(drawn - validated).mean() < 2.0, (code, np.abs(drawn - validated).mean())
    # final/ holds the EMA adapter (use_ema in the demo), output/adapter_ema.safetensors the same weights.
    exported = load_file(out / "final" / adapters.ADAPTER_FILE)
    ema = load_file(out / "adapter_ema.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not all(torch.equal(exported[k], load_file(out / "adapter.safetensors")[k]) for k in exported)


def test_lokr_on_an_nf4_base_falls_and_resumes_bit_exactly_after_sigterm(lokr_reference, shared_workspace):
    reference, done = lokr_reference
    assert "base transformer in nf4-bnb (bitsandbytes, quantized on the CPU" in done.stderr
    assert "LyCORIS lokr on 32 modules" in done.stderr
    evals = _eval(reference)
    assert evals["end"] < evals["start"] - 0.05, evals
    out = shared_workspace / "out-lokr-sigterm"
    env = cli_env(shared_workspace, out, **LOKR_NF4)
    proc = start_cli(env)
    reader = Reader(proc)
    assert reader.wait_for("saved checkpoint-8", timeout=240), reader.text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, reader.text()[-3000:]
    stopped = checkpoints.list_checkpoints(out / "checkpoints")[0][-1].step
    assert 8 <= stopped < 24
    second = run_cli(env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from checkpoint-{stopped}" in second.stderr
    for name in ("adapter.safetensors", "adapter_ema.safetensors", f"final/{adapters.ADAPTER_FILE}"):
        a, b = load_file(reference / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lokr_export_is_a_lycoris_file_that_lycoris_loads(lokr_reference, shared_workspace):
    from diffusers import SanaTransformer2DModel
    from lycoris import create_lycoris_from_weights

    reference, _ = lokr_reference
    weights = load_file(reference / "final" / adapters.ADAPTER_FILE)
    assert any(k.startswith("lycoris_transformer_blocks_0_attn1_to_q.lokr_w") for k in weights)
    assert json.loads((reference / "final" / adapters.LYCORIS_CONFIG_FILE).read_text())["algo"] == "lokr"
    card = (reference / "final" / "README.md").read_text()
    assert "create_lycoris_from_weights" in card and "ComfyUI" in card and "nf4-bnb" in card
    base = models.builtin_model_path(shared_workspace / "cache")
    transformer = SanaTransformer2DModel.from_pretrained(base, subfolder="transformer")
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    net, _ = create_lycoris_from_weights(1.0, str(reference / "final" / adapters.ADAPTER_FILE), transformer)
    net.merge_to(1.0)
    changed = [k for k, v in transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".attn" in k and k.endswith(".weight") for k in changed)


@pytest.mark.parametrize("precision", ["nf4-bnb", "int8-bnb"])
def test_quantized_base_trains_an_adapter_on_the_cpu(precision, shared_workspace):
    """Every linear layer of the blocks quantized, the forward close to the bf16 one, a LoRA step changes the
    adapter and nothing else."""
    import bitsandbytes as bnb
    from diffusers import SanaTransformer2DModel

    base = models.builtin_model_path(shared_workspace / "cache")
    cfg = SimpleNamespace(base_model_precision=precision, mixed_precision="bf16", quantize_via="cpu",
                          model_type="lora", lora_type="standard", lora_rank=4, lora_alpha=None, lora_dropout=0.0,
                          lora_target_modules=adapters.DEFAULT_TARGETS)
    plain = SanaTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=torch.bfloat16)
    model = SanaTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=torch.bfloat16)
    done = adapters.quantize_base(model, cfg, torch.device("cpu"))
    kind = bnb.nn.Linear4bit if precision == "nf4-bnb" else bnb.nn.Linear8bitLt
    linear = [m for b in model.transformer_blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert done["layers"] == len(linear) and all(isinstance(m, kind) for m in linear)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16, 16)
    text, mask, t = torch.randn(1, 6, 64), torch.ones(1, 6, dtype=torch.long), torch.tensor([500.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(x.bfloat16(), encoder_hidden_states=text.bfloat16(), encoder_attention_mask=mask, timestep=t)[0]
        got = model(x.bfloat16(), encoder_hidden_states=text.bfloat16(), encoder_attention_mask=mask, timestep=t)[0]
    assert (got.float() - want.float()).norm() / want.float().norm() < 0.2  # 4- and 8-bit rounding, not garbage
    attached = adapters.attach(model, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert attached.params == sum(p.numel() for p in trainable.values()) and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.bfloat16(), encoder_hidden_states=text.bfloat16(), encoder_attention_mask=mask, timestep=t)[0]
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ---------------------------------------------------------------- bad combinations


@pytest.mark.parametrize(("extra", "needles"), [
    ({"SANA_BASE_MODEL_PRECISION": "nf4-bnb"}, ["cannot be trained in a full-rank", "model_type: lora",
                                                 "lowest-vram-lokr"]),
    ({"SANA_MODEL_TYPE": "lora", "SANA_BASE_MODEL_PRECISION": "int8-quanto"}, ["nf4-bnb or int8-bnb"]),
    ({"SANA_MODEL_TYPE": "lora", "SANA_LYCORIS_CONFIG": "lyco.json"}, ["lycoris_config", "lora_type: lycoris"]),
    ({"SANA_MODEL_TYPE": "lora", "SANA_LORA_TYPE": "lycoris", "SANA_LORA_RANK": "32"},
     ["lora_rank=32", "standard-LoRA option"]),
    ({"SANA_MODEL_TYPE": "lora", "SANA_DISTRIBUTED_STRATEGY": "fsdp", "SANA_OPTIMIZER": "adamw"},
     ["distributed_strategy", "ddp"]),
    ({"SANA_MODEL_TYPE": "lora", "SANA_COMPILE_TRANSFORMER": "true"}, ["compile_transformer"]),
    ({"SANA_LORA_RANK": "32"}, ["lora_rank=32", "no effect with model_type: full"]),
])
def test_bad_adapter_combinations_are_refused_with_the_fix(tmp_path, extra, needles):
    with pytest.raises(ConfigError) as exc:
        resolve(env_for(tmp_path, PRESET="24g", **extra))
    text = problems_of(exc)
    assert all(n in text for n in needles), text


def test_a_simpletuner_lycoris_config_is_read_and_checked(tmp_path):
    good = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
            "apply_preset": {"target_module": ["Attention", "FeedForward"],
                             "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}
    cfg = SimpleNamespace(lycoris_config=str(tmp_path / "l.json"), base_model_precision="nf4-bnb")
    (tmp_path / "l.json").write_text(json.dumps(good))
    assert adapters.read_lycoris_config(cfg) == good
    for bad, needle in [({**good, "algo": "lokrr"}, "unknown LyCORIS algo 'lokrr'"),
                        ({**good, "factr": 8}, "factr is not option(s) LyCORIS reads"),
                        ({**good, "multiplier": 0.5}, "set multiplier: 1.0"),
                        ({**good, "apply_preset": {"module_algo_map": {"Attention": {"factr": 8}}}},
                         "module_algo_map['Attention'] has factr"),
                        ({**good, "bypass_mode": False}, "bypass_mode=false cannot train over a quantized base"),
                        ({**good, "apply_preset": {"target_modules": ["Attention"]}}, "unknown key(s) target_modules")]:
        (tmp_path / "l.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError) as exc:
            adapters.read_lycoris_config(cfg)
        assert needle in str(exc.value), str(exc.value)
    (tmp_path / "l.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        adapters.read_lycoris_config(cfg)


def test_unknown_lycoris_algo_stops_before_any_download(shared_workspace, tmp_path):
    (shared_workspace / "config").mkdir(exist_ok=True)
    path = tmp_path / "lycoris.json"
    path.write_text(json.dumps({"algo": "lokx", "linear_dim": 16}))
    done = run_cli(cli_env(shared_workspace, tmp_path / "out", SANA_MODEL_TYPE="lora", SANA_LORA_TYPE="lycoris",
                           SANA_LYCORIS_CONFIG=str(path)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unknown LyCORIS algo 'lokx'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_two_processes_train_the_same_lora_as_one(shared_workspace, tmp_path):
    """DDP over the adapter: 2 processes x batch 4 end where 1 process x batch 8 ends (TOLERANCE of conftest: the
    all-reduce sums in another order), and rank 0 alone writes the adapter-only checkpoints."""
    from conftest import TOLERANCE

    steps = {"SANA_MODEL_TYPE": "lora", "SANA_LORA_RANK": "4", "SANA_MAX_TRAIN_STEPS": "8",
             "SANA_CHECKPOINTING_STEPS": "4", "SANA_VALIDATION_STEPS": "0", "SANA_USE_EMA": "false"}
    one = run_cli(cli_env(shared_workspace, tmp_path / "one", **steps, SANA_TRAIN_BATCH_SIZE="8"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(cli_env(shared_workspace, tmp_path / "two", **steps, SANA_TRAIN_BATCH_SIZE="4", SANA_NUM_PROCESSES="2"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    ckpt = tmp_path / "two" / "checkpoints"
    start, end = (load_file(ckpt / f"checkpoint-{n}" / "adapter.safetensors") for n in (4, 8))
    assert any(not torch.equal(start[k], end[k]) for k in end)  # it trained between the checkpoints
    assert json.loads((tmp_path / "two" / "run.json").read_text())["distributed"]["world_size"] == 2


def test_an_adapter_run_goes_to_the_hub_and_a_new_machine_resumes_it_bit_identical(lora_run, shared_workspace,
                                                                                      tmp_path):
    """push_to_hub with an adapter: the adapter checkpoints go up while training, a new pod with an empty workspace
    resumes from the Hub, and the adapter it ends with is the uninterrupted run's (lora_run, same config)."""
    from hubserver import FakeHub
    from test_hub_cloud import assert_everything_on_the_hub, cloud_env, repo_files, wait_for

    reference, _ = lora_run
    with FakeHub() as hub:
        from conftest import PLANTED_TOKEN

        hub.write_tokens.add(PLANTED_TOKEN)
        first = tmp_path / "pod-1" / "out"
        proc = start_cli(cloud_env(shared_workspace, first, hub.url, SANA_HUB_STOP_UPLOAD_S="60", **LORA))
        try:
            wait_for(lambda: (first / "checkpoints" / "checkpoint-20" / "COMPLETE").is_file(), 180, proc)
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=120)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 143, out[-4000:]
        second = tmp_path / "pod-2" / "out"
        result = run_cli(cloud_env(tmp_path / "pod-2" / "workspace", second, hub.url, **LORA))
        assert result.returncode == 0, result.stderr[-4000:]
        assert "resumed from checkpoint-" in result.stderr and "of this run from" in result.stderr
        got, want = load_file(second / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        files = repo_files(hub)
        for name in (adapters.ADAPTER_FILE, "README.md", "merged/model_index.json", "adapter.safetensors"):
            assert name in files, name
        assert files[adapters.ADAPTER_FILE] == (second / "final" / adapters.ADAPTER_FILE).read_bytes()
        assert "transformer.safetensors" not in files
        assert_everything_on_the_hub(hub, second, full_rank=False)


def test_a_resume_refuses_changed_lycoris_settings_but_takes_a_new_dropout(shared_workspace, tmp_path):
    """The LyCORIS file's content, not only its path, is what a checkpoint was trained with."""
    path = tmp_path / "lycoris.json"
    config = {**adapters.DEFAULT_LYCORIS, "linear_dim": 4}
    path.write_text(json.dumps(config))
    env = cli_env(shared_workspace, tmp_path / "out", SANA_MODEL_TYPE="lora", SANA_LORA_TYPE="lycoris",
                  SANA_LYCORIS_CONFIG=str(path), SANA_MAX_TRAIN_STEPS="4", SANA_CHECKPOINTING_STEPS="4",
                  SANA_VALIDATION_STEPS="0")
    assert run_cli(env).returncode == 0
    path.write_text(json.dumps({**config, "factor": 8}))
    refused = run_cli({**env, "SANA_MAX_TRAIN_STEPS": "6"})
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "LyCORIS settings changed since the checkpoint (factor: 16 -> 8" in refused.stderr
    assert "Traceback" not in refused.stderr
    path.write_text(json.dumps({**config, "dropout": 0.1}))
    resumed = run_cli({**env, "SANA_MAX_TRAIN_STEPS": "6"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint-4" in resumed.stderr
