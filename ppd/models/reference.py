"""The real checkpoints' architectures, written down from their public configs, and reduced-depth copies of them.

Nothing here downloads anything. The values are those of the checkpoints the cluster presets name (sources beside
each), so that `ppd check-real` can (a) compare the configs this project builds itself (Stage C) with them key by key,
(b) size the real models on the meta device, and (c) build the same classes at the same widths with fewer layers and
random weights, saved in the repositories' layouts, to run one batch through every job's code path on a CPU.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlavaOnevisionConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

# stabilityai/stable-cascade-prior prior_lite/ and prior/ config.json: StableCascadeUNet arguments as diffusers'
# scripts/convert_stable_cascade{_lite}.py build them (Stability's StageC(c_cond=1536, c_hidden=[1536, 1536],
# nhead=[24, 24], blocks=[[4, 12], [12, 4]]) for the 1B lite, the defaults for the 3.6B).
_STAGE_C_COMMON: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 1,
    "down_blocks_repeat_mappers": (1, 1),
    "up_blocks_repeat_mappers": (1, 1),
    "block_types_per_layer": (("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
    "clip_text_in_channels": 1280,
    "clip_text_pooled_in_channels": 1280,
    "clip_image_in_channels": 768,
    "clip_seq": 4,
    "kernel_size": 3,
    "dropout": (0.1, 0.1),
    "self_attn": True,
    "timestep_conditioning_type": ("sca", "crp"),
    "switch_level": (False,),
}
STAGE_C_PRIOR: dict[str, dict[str, Any]] = {
    "stage_c_lite": {
        **_STAGE_C_COMMON,
        "conditioning_dim": 1536,
        "block_out_channels": (1536, 1536),
        "num_attention_heads": (24, 24),
        "down_num_layers_per_block": (4, 12),
        "up_num_layers_per_block": (12, 4),
    },
    "stage_c": {
        **_STAGE_C_COMMON,
        "conditioning_dim": 2048,
        "block_out_channels": (2048, 2048),
        "num_attention_heads": (32, 32),
        "down_num_layers_per_block": (8, 24),
        "up_num_layers_per_block": (24, 8),
    },
}
STAGE_C_SUBFOLDER = {"stage_c_lite": "prior_lite", "stage_c": "prior"}

# stabilityai/stable-cascade decoder/ (Stage B, 1.5B): diffusers' scripts/convert_stable_cascade.py.
STAGE_B_DECODER: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 2,
    "conditioning_dim": 1280,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_num_layers_per_block": (2, 6, 28, 6),
    "up_num_layers_per_block": (6, 28, 6, 2),
    "down_blocks_repeat_mappers": (1, 1, 1, 1),
    "up_blocks_repeat_mappers": (3, 3, 2, 2),
    "num_attention_heads": (0, 0, 20, 20),
    "block_types_per_layer": (
        ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
    ),
    "clip_text_pooled_in_channels": 1280,
    "clip_seq": 4,
    "effnet_in_channels": 16,
    "pixel_mapper_in_channels": 3,
    "kernel_size": 3,
    "dropout": (0, 0, 0.1, 0.1),
    "self_attn": True,
    "timestep_conditioning_type": ("sca",),
}
# stabilityai/stable-cascade vqgan/ (Stage A): Würstchen v2's VQGAN, PaellaVQModel's defaults.
STAGE_A_VQGAN: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "up_down_scale_factor": 2,
    "levels": 2,
    "bottleneck_blocks": 12,
    "embed_dim": 384,
    "latent_channels": 4,
    "num_vq_embeddings": 8192,
    "scale_factor": 0.3764,
}


def clip_bigg_text_config(layers: int = 32, vocab_size: int = 49408) -> CLIPTextConfig:
    """The prior's text_encoder/: CLIP ViT-bigG/14 text tower (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=layers,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _clip(text: dict[str, Any], vision: dict[str, Any], projection: int, layers: int | None, vocab: int) -> CLIPConfig:
    text = {**text, "vocab_size": vocab, "max_position_embeddings": 77, "projection_dim": projection}
    vision = {**vision, "image_size": 224, "patch_size": 14, "projection_dim": projection}
    if layers is not None:
        text["num_hidden_layers"] = vision["num_hidden_layers"] = layers
    return CLIPConfig(
        text_config=CLIPTextConfig(**text).to_dict(),
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        projection_dim=projection,
    )


def clip_vit_h14_config(layers: int | None = None, vocab_size: int = 49408) -> CLIPConfig:
    """OpenCLIP ViT-H/14 in transformers' CLIPModel (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; PickScore_v1 and HPSv2
    share it); `layers` reduces both towers to that depth."""
    return _clip(
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16},
        projection=1024,
        layers=layers,
        vocab=vocab_size,
    )


def clip_vit_l14_config(layers: int | None = None, vocab_size: int = 49408) -> CLIPConfig:
    """openai/clip-vit-large-patch14 (the tower under the LAION aesthetic head)."""
    return _clip(
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        projection=768,
        layers=layers,
        vocab=vocab_size,
    )


# llava-hf/llava-onevision-qwen2-7b-ov(-chat)-hf: transformers' convert_llava_onevision_weights_to_hf.py (Qwen2-7B-
# Instruct text model, SigLIP so400m/14 at 384 px with its last layer dropped, 729 image tokens, any-res up to 6 x 6).
LLAVA_OV_7B_VOCAB = 152128  # Qwen2's 152064 + <image>, <video>, padded to a multiple of 64
LLAVA_OV_IMAGE_SIZE = 384
LLAVA_OV_GRID_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def llava_onevision_7b_config(
    text_layers: int = 28,
    vision_layers: int = 26,
    vocab_size: int = LLAVA_OV_7B_VOCAB,
    image_token_id: int = 151646,
    video_token_id: int = 151647,
    eos_token_id: int = 151645,
    pad_token_id: int | None = None,
) -> LlavaOnevisionConfig:
    """LLaVA-OneVision Qwen2-7B; fewer layers (and a smaller vocabulary, for a tokenizer built offline) reduce it."""
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=text_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=LLAVA_OV_IMAGE_SIZE,
        patch_size=14,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS,
        tie_word_embeddings=False,
    )


def reduced_depth(config: dict[str, Any], layers: int = 1) -> dict[str, Any]:
    """A StableCascadeUNet config with every level's block count cut to `layers` (widths, heads, mappers kept)."""
    reduced = copy.deepcopy(config)
    levels = len(reduced["block_out_channels"])
    reduced["down_num_layers_per_block"] = (layers,) * levels
    reduced["up_num_layers_per_block"] = (layers,) * levels
    return reduced


def normalised(config: dict[str, Any]) -> dict[str, Any]:
    """Lists and tuples compared alike (JSON turns tuples into lists)."""

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    return {key: plain(value) for key, value in config.items()}
