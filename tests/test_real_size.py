"""The real-size built-in model (issue 14, item 1): `builtin:sana-1600m-random` has Sana 1.6B's parts at their
real sizes (counted on the meta device: no memory), and the same builder, at small sizes on the CPU, writes a
folder that the appliance's loader and SanaPipeline load."""

from __future__ import annotations

import json

import pytest
import torch

from sana_appliance.model import BUILTIN_RANDOM, parts


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_real_size_configs_have_the_real_parameter_counts():
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from sana_appliance.benchmarks import gpu

    with torch.device("meta"):
        assert _count(SanaTransformer2DModel(**parts.SANA_1600M_CONFIG)) == gpu.SANA_1600M_PARAMETERS == 1_604_462_752
        assert _count(AutoencoderDC(**parts.DCAE_F32C32_CONFIG)) == 312_250_275
        assert _count(Gemma2Model(Gemma2Config(**parts.GEMMA2_2B_CONFIG))) == 2_614_341_888
    assert parts.SANA_1600M_CONFIG == gpu.SANA_1600M  # one config, the benchmark's and the built-in's


SMALL = {
    "transformer": dict(parts.SANA_1600M_CONFIG, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                        caption_channels=64, in_channels=8, out_channels=8),
    "vae": dict(parts.TINY_VAE_CONFIG, scaling_factor=0.5),
    "text_encoder": dict(parts.GEMMA2_2B_CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32),
}


def test_the_builder_writes_a_pipeline_the_appliance_and_diffusers_load(tmp_path):
    from diffusers import SanaPipeline

    folder = tmp_path / "sana-random"
    parts.build_random_sana(folder, torch.device("cpu"), seed=0, configs=SMALL)
    assert json.loads((folder / "BUILT_BY_SANA_APPLIANCE.json").read_text())["model"] == BUILTIN_RANDOM
    loaded = parts.load_parts(folder, "test", torch.bfloat16)
    assert next(loaded.transformer.parameters()).dtype == torch.bfloat16
    assert next(loaded.vae.parameters()).dtype == torch.float32
    pipe = SanaPipeline.from_pretrained(folder)
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16  # as saved
    pipe.to(torch.float32)
    image = pipe("a red circle on a blue background", height=64, width=64, num_inference_steps=2, max_sequence_length=48,
                 use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # Seeded: a second build is the same model.
    again = tmp_path / "again"
    parts.build_random_sana(again, torch.device("cpu"), seed=0, configs=SMALL)
    for name in ("transformer", "text_encoder", "vae"):
        first = sorted((folder / name).glob("*.safetensors"))
        assert first and [p.read_bytes() for p in first] == [p.read_bytes() for p in sorted((again / name).glob("*.safetensors"))]


def test_the_config_accepts_the_real_size_builtin(tmp_path):
    from sana_appliance.config.resolve import resolve

    resolved = resolve({"WORKSPACE": str(tmp_path), "SANA_PRETRAINED_MODEL_NAME_OR_PATH": BUILTIN_RANDOM})
    assert resolved.config.pretrained_model_name_or_path == BUILTIN_RANDOM


@pytest.mark.parametrize("spec", ["builtin:sana-600m-random", "builtin:nope"])
def test_an_unknown_builtin_is_refused_with_the_known_ones(tmp_path, spec):
    from sana_appliance.config.resolve import resolve
    from sana_appliance.core.errors import ConfigError

    with pytest.raises(ConfigError, match="builtin:sana-1600m-random"):
        resolve({"WORKSPACE": str(tmp_path), "SANA_PRETRAINED_MODEL_NAME_OR_PATH": spec})
