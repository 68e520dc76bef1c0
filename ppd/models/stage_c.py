"""Stable Cascade architecture presets: Stage C (tiny, lite 1B, full 3.6B) and the tiny Stage B / Stage A / CLIP sizes."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock

from ppd.models.codec import ToyCodec

Architecture = Literal["tiny", "stage_c_lite", "stage_c"]
ARCHITECTURES: tuple[str, ...] = ("tiny", "stage_c_lite", "stage_c")

# Width of the tiny CLIP text encoder (hidden and projection) and of the tiny image-embedding slot.
TINY_CLIP_DIM = 32
# The toy world's codec: 32 x 32 RGB -> 12 x 16 x 16 latents (pixel unshuffle by 2). A larger factor puts more pixels in
# one latent token (4: 48 channels), which the tiny model denoised far worse within a token (blocky, noisy samples).
TOY_CODEC_FACTOR = 2
TOY_LATENT_CHANNELS = ToyCodec(TOY_CODEC_FACTOR).latent_channels

# Every Stage C level is [ResBlock, TimestepBlock, AttnBlock] repeated; shared by all three presets.
_STAGE_C_BLOCK_TYPES = (("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2


def _stage_c_common() -> dict[str, Any]:
    return {
        "timestep_ratio_embedding_dim": 64,
        "patch_size": 1,
        "down_blocks_repeat_mappers": (1, 1),
        "up_blocks_repeat_mappers": (1, 1),
        "block_types_per_layer": _STAGE_C_BLOCK_TYPES,
        "clip_seq": 4,
        "kernel_size": 3,
        "self_attn": True,
        "timestep_conditioning_type": ("sca", "crp"),
        "switch_level": (False,),
    }


def stage_c_unet_config(architecture: Architecture) -> dict[str, Any]:
    """Keyword arguments of `StableCascadeUNet` for a Stage C architecture."""
    if architecture == "tiny":
        # Toy world: 32x32 RGB through the toy codec = 12 x 16 x 16 latents; ~0.5M parameters. Unlike the real Stage C
        # (both levels at 24 x 24), the second level runs at half the side (switch_level): its attention sees the whole
        # 8 x 8 layout cheaply, the first level keeps the pixels' detail. No dropout: the tiny base underfits rather
        # than overfits, and the frozen base never runs dropout anyway.
        sizes = {
            "in_channels": TOY_LATENT_CHANNELS,
            "out_channels": TOY_LATENT_CHANNELS,
            "switch_level": (True,),
            "conditioning_dim": 64,
            "block_out_channels": (64, 64),
            "num_attention_heads": (2, 2),
            "down_num_layers_per_block": (1, 2),
            "up_num_layers_per_block": (2, 1),
            "clip_text_in_channels": TINY_CLIP_DIM,
            "clip_text_pooled_in_channels": TINY_CLIP_DIM,
            "clip_image_in_channels": TINY_CLIP_DIM,
            "dropout": (0.0, 0.0),
        }
    elif architecture in ("stage_c_lite", "stage_c"):
        lite = architecture == "stage_c_lite"
        width = 1536 if lite else 2048
        sizes = {
            "in_channels": 16,
            "out_channels": 16,
            "conditioning_dim": width,
            "block_out_channels": (width, width),
            "num_attention_heads": (24, 24) if lite else (32, 32),
            "down_num_layers_per_block": (4, 12) if lite else (8, 24),
            "up_num_layers_per_block": (12, 4) if lite else (24, 8),
            "clip_text_in_channels": 1280,  # CLIP ViT-bigG hidden states
            "clip_text_pooled_in_channels": 1280,
            "clip_image_in_channels": 768,  # CLIP ViT-L/14 image embeddings
            "dropout": (0.1, 0.1),
        }
    else:
        raise ValueError(f"unknown Stage C architecture {architecture!r}; choose one of {ARCHITECTURES}")
    return {**_stage_c_common(), **sizes}


def tiny_stage_b_config() -> dict[str, Any]:
    """A tiny Stage B (`StableCascadeUNet` decoder): 4-channel latents conditioned on tiny Stage C latents."""
    return {
        "in_channels": 4,
        "out_channels": 4,
        "timestep_ratio_embedding_dim": 64,
        "patch_size": 2,
        "conditioning_dim": 32,
        "block_out_channels": (16, 32),
        "num_attention_heads": (0, 2),
        "down_num_layers_per_block": (1, 1),
        "up_num_layers_per_block": (1, 1),
        "down_blocks_repeat_mappers": (1, 1),
        "up_blocks_repeat_mappers": (1, 1),
        "block_types_per_layer": (
            ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
            ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ),
        "clip_text_pooled_in_channels": TINY_CLIP_DIM,
        "clip_seq": 4,
        "effnet_in_channels": TOY_LATENT_CHANNELS,
        "pixel_mapper_in_channels": 3,
        "kernel_size": 3,
        "dropout": (0.0, 0.0),
        "self_attn": True,
        "timestep_conditioning_type": ("sca",),
    }


def tiny_stage_a_config() -> dict[str, Any]:
    """A tiny Stage A (`PaellaVQModel`): 4-channel latents -> RGB at 4x their side, like the real one."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "up_down_scale_factor": 2,
        "levels": 2,
        "bottleneck_blocks": 1,
        "embed_dim": 16,
        "latent_channels": 4,
        "num_vq_embeddings": 16,
        "scale_factor": 0.3764,
    }


def build_stage_c(architecture: Architecture, device: torch.device | str | None = None) -> StableCascadeUNet:
    """A randomly initialised Stage C of the given architecture (use device="meta" to size the real ones)."""
    with torch.device(device or "cpu"):
        return StableCascadeUNet(**stage_c_unet_config(architecture))


def attention_blocks(unet: StableCascadeUNet) -> list[tuple[str, SDCascadeAttnBlock]]:
    """Every `SDCascadeAttnBlock` of a Stage C with its module path, in module order."""
    return [(name, module) for name, module in unet.named_modules() if isinstance(module, SDCascadeAttnBlock)]
