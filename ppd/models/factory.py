"""Model factory: real Stable Cascade weights or tiny local ones, both loaded through `from_pretrained(path)`.

Tiny models are built once with random weights from a fixed seed, saved in the Hugging Face layout under
`ModelConfig.cache_dir/<TINY_MODELS_VERSION>/` and reloaded from there, so tests and the toy world exercise the
exact loading code that real checkpoints go through. The tiny directory mirrors the two real repositories:

    prior/  text_encoder/  tokenizer/      (as stabilityai/stable-cascade-prior; the lite prior is prior_lite/)
    decoder/  vqgan/                       (as stabilityai/stable-cascade)

The user-embedding VLM (LLaVA-OneVision) is built and loaded by `ppd.embed`, not here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from ppd.config import ModelConfig
from ppd.models.adapter import AdapterConfig, PersonalizedStageC, UserAdapter
from ppd.models.codec import STAGE_C_TO_STAGE_B_SCALE, StageBADecoder, ToyCodec
from ppd.models.local_cache import build_once
from ppd.models.stage_c import (
    TOY_CODEC_FACTOR,
    Architecture,
    build_stage_c,
    stage_c_unet_config,
    tiny_stage_a_config,
    tiny_stage_b_config,
)
from ppd.models.text import CaptionEncoder, build_tiny_clip_tokenizer, tiny_clip_text_config

# Bump when a tiny config changes, so stale caches are not reused.
TINY_MODELS_VERSION = "tiny-v2"  # v2: 32 px toy world (half-side second level), deterministic tokenizer
TINY_MODELS_SEED = 0
# Tiny Stage B latents are 2x the Stage C side (8 -> 16), Stage A upsamples 4x (16 -> 64 px).
TINY_STAGE_B_SCALE = 2.0
DEFAULT_DECODER_PATH = "stabilityai/stable-cascade"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_models_dir(cache_dir: str | Path) -> Path:
    """Directory of the tiny models (prior, text encoder, tokenizer, decoder, vqgan), built on first use."""
    return build_once(Path(cache_dir) / TINY_MODELS_VERSION, "prior/config.json", _save_tiny_models)


def _save_tiny_models(directory: Path) -> None:
    # Seeded in a forked RNG: the same tiny weights on every machine, and the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODELS_SEED)
        build_stage_c("tiny").save_pretrained(directory / "prior")
        tokenizer = build_tiny_clip_tokenizer()
        tokenizer.save_pretrained(directory / "tokenizer")
        CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer)).save_pretrained(directory / "text_encoder")
        StableCascadeUNet(**tiny_stage_b_config()).save_pretrained(directory / "decoder")
        PaellaVQModel(**tiny_stage_a_config()).save_pretrained(directory / "vqgan")


def _prior_location(cfg: ModelConfig) -> tuple[str, str | None]:
    """(root, subfolder) of the Stage C weights."""
    if cfg.architecture == "tiny":
        if cfg.stage_c_path is None:
            return str(tiny_models_dir(cfg.cache_dir)), "prior"
        root = cfg.stage_c_path  # e.g. a toy-world base pretrained and saved with save_pretrained
    elif cfg.stage_c_path is None:
        raise ValueError(
            f"architecture {cfg.architecture!r} needs model.stage_c_path (e.g. stabilityai/stable-cascade-prior)"
        )
    else:
        root = cfg.stage_c_path
    if (Path(root) / "config.json").exists():
        return root, None
    return root, "prior_lite" if cfg.architecture == "stage_c_lite" else "prior"


def _text_root(cfg: ModelConfig) -> str:
    # Real: the prior repository carries CLIP ViT-bigG (text_encoder/, tokenizer/). Tiny: a pretrained toy base
    # carries the text encoder it was trained with (same layout); a random tiny prior goes with the random tiny one.
    if cfg.architecture == "tiny":
        if cfg.stage_c_path is not None and (Path(cfg.stage_c_path) / "text_encoder").is_dir():
            return cfg.stage_c_path
        return str(tiny_models_dir(cfg.cache_dir))
    return _prior_location(cfg)[0]


def load_stage_c(cfg: ModelConfig, device: torch.device | str = "cpu") -> StableCascadeUNet:
    """The frozen Stage C prior named by `cfg` (tiny ones are built into the cache first)."""
    root, subfolder = _prior_location(cfg)
    unet = StableCascadeUNet.from_pretrained(root, subfolder=subfolder, **_weights_options(cfg))
    return unet.to(device).eval().requires_grad_(False)


def _weights_options(cfg: ModelConfig) -> dict:
    # Safetensors only (never a pickle), read straight into the model's dtype; the bf16 variant files where the
    # config names them (the Stable Cascade repositories ship *.bf16.safetensors beside the fp32 ones).
    return {"torch_dtype": _DTYPES[cfg.dtype], "variant": cfg.weights_variant, "use_safetensors": True}


def load_caption_encoder(cfg: ModelConfig, device: torch.device | str = "cpu") -> CaptionEncoder:
    """CLIP tokenizer + text encoder matching the Stage C of `cfg`."""
    root = _text_root(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    options = _weights_options(cfg)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        root,
        subfolder="text_encoder",
        dtype=options["torch_dtype"],
        variant=options["variant"],
        use_safetensors=True,
    )
    return CaptionEncoder(tokenizer, text_encoder.to(device))


def load_stage_ba_decoder(
    root: str | Path,
    latent_dim_scale: float = STAGE_C_TO_STAGE_B_SCALE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
    steps: int = 10,
) -> StageBADecoder:
    """Stage B (`decoder/`) + Stage A (`vqgan/`) from a Stable Cascade decoder directory or hub id (safetensors only)."""
    options = {"torch_dtype": dtype, "variant": variant, "use_safetensors": True}
    stage_b = StableCascadeUNet.from_pretrained(str(root), subfolder="decoder", **options)
    stage_a = PaellaVQModel.from_pretrained(str(root), subfolder="vqgan", **options)
    return StageBADecoder(stage_b.to(device), stage_a.to(device), latent_dim_scale=latent_dim_scale, steps=steps)


def load_decoder(cfg: ModelConfig, device: torch.device | str = "cpu") -> ToyCodec | StageBADecoder:
    """How `cfg`'s Stage C latents become pixels: the toy codec (tiny) or Stage B + Stage A (real)."""
    if cfg.architecture == "tiny":
        return ToyCodec(TOY_CODEC_FACTOR)
    return load_stage_ba_decoder(
        cfg.decoder_path or DEFAULT_DECODER_PATH,
        dtype=_DTYPES[cfg.dtype],
        device=device,
        variant=cfg.weights_variant,
        steps=cfg.decoder_steps,
    )


def load_tiny_stage_ba_decoder(cache_dir: str | Path, device: torch.device | str = "cpu") -> StageBADecoder:
    """The tiny Stage B + Stage A (for tests of the real decoding path on CPU)."""
    return load_stage_ba_decoder(tiny_models_dir(cache_dir), TINY_STAGE_B_SCALE, device=device)


def resolved_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its local paths made absolute: Ray workers do not run in the driver's directory.

    The tiny-model cache always; weights paths when they name a local directory (hub ids stay as they are)."""
    update = {"cache_dir": str(Path(cfg.cache_dir).resolve())}
    for field in ("stage_c_path", "decoder_path"):
        value = getattr(cfg, field)
        if value is not None and Path(value).exists():
            update[field] = str(Path(value).resolve())
    return cfg.model_copy(update=update)


def latent_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """Stage C latent [C, H, W] of `cfg` (12 x 8 x 8 for the toy world, 16 x 24 x 24 for 1024 px)."""
    return (stage_c_unet_config(cfg.architecture)["in_channels"], cfg.latent_size, cfg.latent_size)


def adapter_config(cfg: ModelConfig, embedding_shape: tuple[int, int], base: StableCascadeUNet) -> AdapterConfig:
    """The adapter shape for user embeddings [L, d] on `base`, with `cfg`'s user tokens and init."""
    layers, width = embedding_shape
    return AdapterConfig(
        embedding_layers=layers,
        embedding_dim=width,
        user_tokens=cfg.user_tokens,
        conditioning_dim=base.config.conditioning_dim,
        init=cfg.adapter_init,
    )


def build_personalized_stage_c(
    cfg: ModelConfig, embedding_shape: tuple[int, int], device: torch.device | str = "cpu"
) -> PersonalizedStageC:
    """Frozen Stage C of `cfg` + a freshly initialised user adapter for embeddings [L, d]."""
    base = load_stage_c(cfg, device)
    with torch.device(device):
        adapter = UserAdapter(adapter_config(cfg, embedding_shape, base), base)
    return PersonalizedStageC(base, adapter.to(base.dtype))


def build_meta_personalized_stage_c(
    architecture: Architecture, embedding_shape: tuple[int, int], user_tokens: int
) -> PersonalizedStageC:
    """The real-size model on the meta device (no memory, no weights): for parameter counts and FLOP sizing."""
    cfg = ModelConfig(architecture=architecture, user_tokens=user_tokens)
    base = build_stage_c(architecture, device="meta")
    with torch.device("meta"):
        adapter = UserAdapter(adapter_config(cfg, embedding_shape, base), base)
    return PersonalizedStageC(base, adapter)


def parameter_report(model: PersonalizedStageC) -> dict[str, int]:
    """Parameter counts: total, frozen base, trainable adapter (W'_k, W'_v, user projection)."""
    adapter_counts = model.adapter.parameter_counts()
    base = sum(p.numel() for p in model.base.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {
        "total": base + trainable,
        "base": base,
        "trainable": trainable,
        "attention_blocks": len(model.adapter.user_kv),
        **adapter_counts,
        "w_k_plus_w_v": adapter_counts["w_k"] + adapter_counts["w_v"],
    }


def save_random_adapter(
    cfg: ModelConfig,
    directory: str | Path,
    embedding_shape: tuple[int, int],
    *,
    method: str = "ppd",
    value_std: float = 0.5,
    seed: int = 1,
) -> Path:
    """An untrained adapter whose W'_v is random instead of zero (so the adapter on differs from off), saved as a
    checkpoint of `method` on `cfg`'s Stage C: a stand-in for a trained adapter in load tests and benchmarks."""
    from ppd.models.checkpoint import save_adapter

    model = build_personalized_stage_c(cfg, embedding_shape)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kv in model.adapter.user_kv.values():
            kv.to_v.weight.copy_(value_std * torch.randn(kv.to_v.weight.shape, generator=generator))
    base_model = cfg.stage_c_path or "tiny"
    return save_adapter(model, directory, architecture=cfg.architecture, base_model=base_model, train_method=method)
