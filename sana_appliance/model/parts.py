"""Model parts: the built-in tiny Sana, loading any Sana pipeline folder, checkpointing policy.

Every model, the demo's included, is loaded by the same `from_pretrained` path: the
tiny model is built in code once, saved in diffusers layout under the cache, and then
loaded like a downloaded one, so the real loading code runs in every test.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..core.errors import AssetError, ConfigError
from ..core.fsutil import atomic_folder
from . import BUILTIN_MODEL, BUILTIN_RANDOM

log = logging.getLogger(__name__)

# Bump when the tiny model's architecture or init changes: the folder name is its identity.
TINY_VERSION = "v4"  # v3: the trained tiny DC-AE (scripts/train_tiny_dcae.py); v4: the trained tiny Gemma-2
# Width of the tiny Gemma-2 (and so the transformer's caption_channels). Every linear layer's
# in_features is a multiple of 64, bitsandbytes' nf4 block: its CPU kernel on AVX512-BF16
# hosts fails on narrower layers, and the tests load this encoder in nf4 (docs/recipe.md).
TINY_TEXT_WIDTH = 64


# The tiny DC-AE (4x spatial compression, 8 latent channels). scripts/train_tiny_dcae.py trains it on the demo's
# shapes; its weights ship in the package (TINY_VAE_WEIGHTS).
TINY_VAE_CONFIG = dict(
    in_channels=3, latent_channels=8, attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)
TINY_VAE_WEIGHTS = Path(__file__).with_name("tiny_dcae.safetensors")
# The tiny Gemma-2, trained by scripts/train_tiny_text_encoder.py to tell the colours' roles apart.
TINY_TEXT_WEIGHTS = Path(__file__).with_name("tiny_gemma2.safetensors")


@dataclass
class SanaParts:
    """The loaded pipeline parts; the text encoder and VAE are frozen."""

    path: Path
    transformer: Any  # SanaTransformer2DModel
    vae: Any  # AutoencoderDC
    tokenizer: Any
    scheduler_config: dict
    identity: str  # stable id of the weights for cache keys and run.json

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE compression x transformer patch)."""
        return self.vae_scale_factor * int(self.transformer.config.patch_size)


def default_complex_human_instruction() -> list[str]:
    """The instruction SanaPipeline prepends at inference (read from diffusers, never copied)."""
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return list(default)


def complex_human_instruction(setting: str) -> list[str] | None:
    """Map the config value to what SanaPipeline.encode_prompt expects."""
    if setting == "default":
        return default_complex_human_instruction()
    if setting == "disabled":
        return None
    return setting.split("\n")


# ---------------------------------------------------------------- the tiny model


# The demo captions' words ("a {colour} {shape} on a {colour} background", data/demo.py; tested to cover them):
# each is one token of the tiny tokenizer, so a colour is one embedding, not a run of letters.
TINY_WORDS = ("a", "on", "background", "circle", "square", "triangle", "red", "green", "blue", "yellow")


def _tiny_tokenizer():
    """Gemma's tokenizer class with a tiny vocabulary: bytes, letters, and TINY_WORDS as whole-word pieces (BPE
    merges letter by letter). Any other text, the complex human instruction included, is spelled in letters."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    symbols = [f"<0x{i:02X}>" for i in range(256)]
    chars = ["▁"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,:;'\"!?-()/")
    pieces, merges = [], []
    for word in TINY_WORDS:
        for k in range(1, len(word) + 1):
            left, right = "▁" + word[:k - 1], word[k - 1]
            if left + right not in pieces:
                pieces.append(left + right)
                merges.append((left, right))
    tokens = specials + symbols + chars + [piece for piece in pieces if piece not in chars]
    return GemmaTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, add_bos_token=True,
                          add_eos_token=False)


def build_tiny_sana(dest: Path, seed: int = 0, text_width: int = TINY_TEXT_WIDTH) -> None:
    """Build the demo's tiny Sana deterministically and save it in diffusers layout (atomic).
    `text_width` is for tests that need another text encoder width (the built-in uses the default)."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, num_layers=4,
        num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64,
        caption_channels=text_width, mlp_ratio=2.5, sample_size=16, patch_size=1,
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = tiny_vae()
    tokenizer, text_encoder = tiny_text_encoder(pretrained=text_width == TINY_TEXT_WIDTH, seed=seed,
                                                text_width=text_width)
    # Sana ships a DPM-Solver config with flow_shift 3.0: reproduce that trap-laden shape exactly.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=3.0, algorithm_type="dpmsolver++", solver_order=2,
    )
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    # transformers writes weights only on global rank 0 of a process group; this folder is built once per disk,
    # by whichever rank serves that disk (distributed/group.py), so this rank must write it.
    text_encoder.should_save_on_this_rank = lambda is_main_process: is_main_process
    # Another machine sharing the cache may have won the rename: its folder is as good as ours.
    with atomic_folder(dest, existing="keep", is_complete=_complete_pipeline) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if not _complete_pipeline(tmp):
            raise RuntimeError(f"building the built-in model wrote an incomplete folder {tmp}: a part has no weights")
        (tmp / "BUILT_BY_SANA_APPLIANCE.json").write_text(
            json.dumps({"model": BUILTIN_MODEL, "version": TINY_VERSION, "seed": seed, "text_width": text_width}))


def tiny_text_encoder(pretrained: bool = True, seed: int = 0, text_width: int = TINY_TEXT_WIDTH):
    """(tokenizer, Gemma2Model) of the tiny Sana. `pretrained`: the weights trained by
    scripts/train_tiny_text_encoder.py (TINY_TEXT_WEIGHTS); else the seeded initialisation it starts from."""
    from safetensors.torch import load_file
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed + 2)
    encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=text_width // 2,
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    ))
    # Word embeddings 5x transformers' default scale: at 0.02 the two random layers' shared context (the long
    # instruction before every caption) drowns the words, and the background colour changes a caption's
    # embedding by almost nothing (cosine 0.93 between "red" and "blue" there); at 0.1 the colours are apart
    # (cosine 0.5-0.64).
    with torch.no_grad():
        encoder.embed_tokens.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed + 3))
    if pretrained:
        encoder.load_state_dict(load_file(TINY_TEXT_WEIGHTS))
    return tokenizer, encoder


def tiny_vae():
    """The demo's DC-AE with its shipped weights (trained on the demo's shapes by scripts/train_tiny_dcae.py; the
    latent scaling factor measured there rides in the file's metadata)."""
    from diffusers import AutoencoderDC
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(TINY_VAE_WEIGHTS), framework="pt") as handle:
        scaling = float(handle.metadata()["scaling_factor"])
    vae = AutoencoderDC(**{**TINY_VAE_CONFIG, "scaling_factor": scaling})
    vae.load_state_dict(load_file(TINY_VAE_WEIGHTS))
    return vae


# ---------------------------------------------------------------- Sana 1.6B at real size, random weights

RANDOM_VERSION = "v1"
# Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers's transformer (1,604,462,752 parameters, tested).
SANA_1600M_CONFIG = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=False,
)
# DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers, as diffusers' conversion script configures it):
# 32x spatial compression, 32 latent channels; 312,250,275 parameters (tested).
DCAE_F32C32_CONFIG = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407,
)
# google/gemma-2-2b's architecture (Gemma2Model, as Sana's text_encoder): 2,614,341,888 parameters (tested).
GEMMA2_2B_CONFIG = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6, rope_theta=10000.0,
    hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1,
)


@contextlib.contextmanager
def _building_on(device: torch.device, dtype: torch.dtype):
    """New modules are allocated and initialised on `device` in `dtype` (a 1.6B init takes a second on a GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random_sana(dest: Path, device: torch.device, seed: int = 0, configs: dict | None = None) -> None:
    """Sana at real size with random weights, in diffusers layout (atomic): the 1.6B transformer and Gemma-2-2b in
    bf16, the DC-AE in fp32, the demo's offline tokenizer (captions spelled in letters: the token count, padded
    to tokenizer_max_length, is what the compute depends on) and Sana's scheduler config. Each part is built on
    `device`, saved and freed before the next, so the peak is the largest part (Gemma-2: 5.2 GB in bf16).
    `configs` ({"transformer", "vae", "text_encoder"}) replaces the real sizes, for tests on a CPU."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    configs = {"transformer": SANA_1600M_CONFIG, "vae": DCAE_F32C32_CONFIG, "text_encoder": GEMMA2_2B_CONFIG,
               **(configs or {})}
    builders = {
        "transformer": (torch.bfloat16, lambda: SanaTransformer2DModel(**configs["transformer"])),
        "vae": (torch.float32, lambda: AutoencoderDC(**configs["vae"])),
        "text_encoder": (torch.bfloat16, lambda: Gemma2Model(Gemma2Config(**configs["text_encoder"]))),
    }
    with atomic_folder(dest, existing="keep", is_complete=_complete_pipeline) as tmp:
        for offset, (name, (dtype, build)) in enumerate(builders.items()):
            torch.manual_seed(seed + offset)
            with _building_on(device, dtype):
                module = build()
            if name == "text_encoder":  # see build_tiny_sana: this rank builds its disk's copy
                module.should_save_on_this_rank = lambda is_main_process: is_main_process
            module.save_pretrained(tmp / name, safe_serialization=True)
            del module
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _tiny_tokenizer().save_pretrained(tmp / "tokenizer")
        DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0, algorithm_type="dpmsolver++", solver_order=2,
                                    ).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "SanaPipeline", "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "Gemma2Model"],
            "tokenizer": ["transformers", "GemmaTokenizer"], "transformer": ["diffusers", "SanaTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderDC"]}, indent=2) + "\n")
        if not _complete_pipeline(tmp):
            raise RuntimeError(f"building {BUILTIN_RANDOM} wrote an incomplete folder {tmp}: a part has no weights")
        (tmp / "BUILT_BY_SANA_APPLIANCE.json").write_text(
            json.dumps({"model": BUILTIN_RANDOM, "version": RANDOM_VERSION, "seed": seed}))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _complete_pipeline(folder: Path) -> bool:
    """model_index.json and weights in every part that has them (not merely the folder names)."""
    return (folder / "model_index.json").is_file() and all(
        any((folder / part).glob("*.safetensors")) for part in ("transformer", "vae", "text_encoder"))


def builtin_model_path(cache_dir: Path, spec: str = BUILTIN_MODEL, device: torch.device | None = None) -> Path:
    """Build a built-in model once under the cache; later calls return the saved folder."""
    from filelock import FileLock

    name = f"tiny-sana-{TINY_VERSION}" if spec == BUILTIN_MODEL else f"sana-1600m-random-{RANDOM_VERSION}"
    dest = cache_dir / "models" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):  # one rank builds, the others wait and load
        if not _complete_pipeline(dest):
            if spec == BUILTIN_MODEL:
                log.info("building the built-in tiny Sana at %s", dest)
                build_tiny_sana(dest)
            else:
                device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
                log.info("building %s (random weights, real size: 1.6B transformer, DC-AE f32c32, Gemma-2-2b) on %s "
                         "at %s", spec, device, dest)
                started = time.monotonic()
                build_random_sana(dest, device)
                log.info("built %s in %.1f s", spec, time.monotonic() - started)
    return dest


# ---------------------------------------------------------------- loading


def load_parts(path: Path, identity: str, weight_dtype: torch.dtype) -> SanaParts:
    """Load a diffusers Sana folder. The transformer is stored in `weight_dtype` (it trains);
    the VAE stays fp32 (deterministic latents). The text encoder is not loaded here: see load_text_encoder."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import AutoTokenizer

    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):  # text_encoder: loaded on demand
        if not (path / sub).is_dir():
            raise AssetError(f"model folder {path} has no {sub}/: it must be a diffusers Sana pipeline folder")
    transformer = SanaTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=weight_dtype)
    vae = AutoencoderDC.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    vae.requires_grad_(False)
    vae.eval()
    transformer.requires_grad_(True)
    transformer.train()
    return SanaParts(path, transformer, vae, tokenizer, scheduler_config, identity)


def load_text_encoder(path: Path, cfg, device: torch.device):
    """The frozen Gemma-2, only while captions are encoded. `text_encoder_1_precision: nf4-bnb`
    loads it 4-bit (bitsandbytes), which is safe because it is never trained."""
    from transformers import Gemma2Model

    if cfg.text_encoder_1_precision == "nf4-bnb":
        encoder = _load_nf4_text_encoder(path, cfg, device)
    else:
        encoder = Gemma2Model.from_pretrained(path / "text_encoder").to(device)
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder


_NF4_FIX = ("set text_encoder_1_precision=no_change (e.g. SANA_TEXT_ENCODER_1_PRECISION=no_change): the text encoder "
            "then runs unquantized while captions are cached (~4 GB more memory during caching only, training is "
            "unchanged)")


def _nf4_error(what: str, exc: BaseException) -> ConfigError:
    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    return ConfigError(f"text_encoder_1_precision='nf4-bnb': {what} ({type(exc).__name__}: {detail}). Fix: {_NF4_FIX}")


def import_bitsandbytes_for_nf4():
    """bitsandbytes, or the ConfigError that text_encoder_1_precision=nf4-bnb cannot work here.
    The preflight calls it too, so the answer comes before any download."""
    try:
        import bitsandbytes
    except ImportError as exc:  # optional at run time: only this setting needs it
        raise _nf4_error("bitsandbytes is not installed", exc) from exc
    except (OSError, RuntimeError) as exc:  # installed, but its native library does not load here
        raise _nf4_error("bitsandbytes is installed but does not load on this machine", exc) from exc
    return bitsandbytes


def _load_nf4_text_encoder(path: Path, cfg, device: torch.device):
    """Gemma-2 in bitsandbytes nf4. Every way this fails (bitsandbytes missing, a build
    without this machine's kernels, a CPU kernel that refuses the layer shapes) becomes a
    ConfigError naming the key and the fix, at load time rather than mid-caching."""
    from transformers import BitsAndBytesConfig, Gemma2Model

    bitsandbytes = import_bitsandbytes_for_nf4()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    # quantize_via=cpu quantizes in host memory first, so a small card never holds the bf16 copy.
    on_cpu = cfg.quantize_via == "cpu" or device.type != "cuda"
    try:
        encoder = Gemma2Model.from_pretrained(path / "text_encoder", quantization_config=quantization,
                                              device_map={"": "cpu" if on_cpu else device.index or 0})
        if device.type == "cuda":
            encoder.to(device)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise _nf4_error("the text encoder could not be loaded in 4-bit", exc) from exc
    linear = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in linear)
    if not quantized:  # caching full-precision embeddings under the nf4 key would be a lie
        raise _nf4_error("no layer was quantized", RuntimeError("transformers ignored the 4-bit config"))
    # bitsandbytes' kernels fail only when first run (e.g. its CPU nf4 path on AVX512-BF16 hosts
    # for layers narrower than 64): one two-token forward surfaces that here, with the fix.
    probe = torch.full((1, 2), int(encoder.config.bos_token_id or 0), dtype=torch.long, device=encoder.device)
    try:
        with torch.no_grad():
            encoder(input_ids=probe)
    except RuntimeError as exc:
        raise _nf4_error(f"bitsandbytes' 4-bit kernel refused to run on this {device.type} machine", exc) from exc
    log.info("text encoder in nf4 (bitsandbytes): %d of %d linear layers 4-bit", quantized, len(linear))
    return encoder


def locate_model(spec: str, revision: str, resolved, device: torch.device | None = None) -> tuple[Path, dict]:
    """Find the model folder for `spec`: built-in, local folder, or Hub (via the assets module).
    Returns (folder, provenance dict for run.json)."""
    if spec in (BUILTIN_MODEL, BUILTIN_RANDOM):
        path = builtin_model_path(resolved.workspace.cache_dir, spec, device)
        return path, {"kind": "builtin", "name": spec, "version": TINY_VERSION if spec == BUILTIN_MODEL else RANDOM_VERSION}
    from ..hub import download as assets

    source = assets.fetch_model(spec, revision, resolved.workspace, resolved.hub, resolved.credentials)
    return source.path, {
        "kind": source.kind, "name": spec, "repo_id": source.repo_id,
        "revision": source.revision, "commit_sha": source.commit_sha, "path": str(source.path),
    }


def weights_identity(provenance: dict) -> str | None:
    """Which base weights a run started from, comparable across machines: the Hub commit or the
    built-in version (a local folder has no identity that survives a move: None)."""
    if provenance.get("commit_sha"):
        return f"{provenance.get('repo_id')}@{provenance['commit_sha']}"
    if provenance.get("kind") == "builtin":
        return f"{provenance.get('name')}@{provenance.get('version')}"
    return None


def model_identity(provenance: dict) -> str:
    """What identifies these weights for cache keys: the Hub sha, or the folder + its index file."""
    if provenance.get("commit_sha"):
        return f"{provenance['repo_id']}@{provenance['commit_sha']}"
    if provenance["kind"] == "builtin":
        return f"{provenance['name']}@{provenance['version']}"
    path = Path(provenance["path"])
    stamp = []
    for sub in ("vae", "text_encoder"):
        for f in sorted((path / sub).glob("*")):
            st = f.stat()
            stamp.append(f"{sub}/{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return f"local:{path}:{'|'.join(stamp)}"


# ---------------------------------------------------------------- memory policy


def _checkpointed_forward(original, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def compile_blocks(transformer) -> int:
    """torch.compile every transformer block in place (``nn.Module.compile``: the module objects and the
    state_dict keys stay as they are; a checkpointed block's wrapper is compiled with it). Shapes that change
    (buckets) are compiled once more, then as dynamic. Returns how many blocks."""
    for block in transformer.transformer_blocks:
        block.compile()
    return len(transformer.transformer_blocks)


def enable_block_checkpointing(transformer, interval: int) -> int:
    """Recompute every `interval`-th transformer block in backward.

    Wraps the chosen blocks' bound `forward` (an instance attribute), so diffusers' model
    code and the state_dict keys stay untouched. Returns how many blocks are wrapped."""
    wrapped = 0
    for index, block in enumerate(transformer.transformer_blocks):
        if index % interval == 0:
            block.forward = functools.partial(_checkpointed_forward, block.forward)
            wrapped += 1
    return wrapped
