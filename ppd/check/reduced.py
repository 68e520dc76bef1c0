"""Reduced-depth copies of the real checkpoints, saved in their repositories' folder layouts and file names.

The same classes at the same widths, heads and config keys as `ppd.models.reference` describes, with one layer where
the real ones have many, random weights, in the requested dtype and weight-file variant (bf16: `*.bf16.safetensors`),
so that the project's own loaders (`from_pretrained(..., variant=..., use_safetensors=True)`) read them exactly as
they would read the published ones. Tokenizers are built offline (the real vocabularies are never fetched): the text
configs take the offline tokenizer's special-token ids. Each folder is built once under a work directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ppd.models.reference import (
    STAGE_A_VQGAN,
    STAGE_B_DECODER,
    STAGE_C_PRIOR,
    STAGE_C_SUBFOLDER,
    clip_bigg_text_config,
    clip_vit_h14_config,
    clip_vit_l14_config,
    llava_onevision_7b_config,
    reduced_depth,
)

REDUCED_LAYERS = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextmanager
def built_in(dtype: torch.dtype, device: torch.device | str = "cpu") -> Iterator[None]:
    """Modules constructed inside are created on `device` in `dtype` (no fp32 CPU copy first, as loading the real
    weights does)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _save_once(target: Path, build: Callable[[Path], None]) -> Path:
    from ppd.models.local_cache import build_once

    return build_once(target, ".complete", lambda scratch: (build(scratch), (scratch / ".complete").touch()))


def _tiny_clip_tokenizer_and_ids():
    from ppd.models.text import build_tiny_clip_tokenizer

    tokenizer = build_tiny_clip_tokenizer()
    return tokenizer, {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def stage_c_repository(workdir: Path, architecture: str, dtype: str, variant: str | None) -> Path:
    """stabilityai/stable-cascade-prior's layout: <prior_lite|prior>/, text_encoder/, tokenizer/ (reduced depth)."""
    from diffusers import StableCascadeUNet
    from transformers import CLIPTextModelWithProjection

    def build(folder: Path) -> None:
        with built_in(_DTYPES[dtype]):
            prior = StableCascadeUNet(**reduced_depth(STAGE_C_PRIOR[architecture], REDUCED_LAYERS))
            text = clip_bigg_text_config(layers=REDUCED_LAYERS)
            tokenizer, ids = _tiny_clip_tokenizer_and_ids()
            text.update(ids)  # the offline tokenizer's special ids (pooling reads the end-of-text id)
            text_encoder = CLIPTextModelWithProjection(text)
        prior.save_pretrained(folder / STAGE_C_SUBFOLDER[architecture], variant=variant)
        tokenizer.save_pretrained(folder / "tokenizer")
        text_encoder.save_pretrained(folder / "text_encoder", variant=variant)

    return _save_once(workdir / f"stable-cascade-prior-{architecture}-{dtype}-{variant}", build)


def decoder_repository(workdir: Path, dtype: str, variant: str | None) -> Path:
    """stabilityai/stable-cascade's layout: effnet_encoder.safetensors (full size), decoder/ and vqgan/ (reduced)."""
    from diffusers import StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    from ppd.models.effnet import EFFNET_FILE, EfficientNetEncoder

    def build(folder: Path) -> None:
        effnet = EfficientNetEncoder()  # float32, as the published file (80 MB); loaded in the model's dtype
        save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, folder / EFFNET_FILE)
        with built_in(_DTYPES[dtype]):
            stage_b = StableCascadeUNet(**reduced_depth(STAGE_B_DECODER, REDUCED_LAYERS))
            stage_a = PaellaVQModel(**{**STAGE_A_VQGAN, "bottleneck_blocks": REDUCED_LAYERS})
        stage_b.save_pretrained(folder / "decoder", variant=variant)
        stage_a.save_pretrained(folder / "vqgan", variant=variant)

    return _save_once(workdir / f"stable-cascade-{dtype}-{variant}", build)


def vlm_directory(workdir: Path, dtype: str) -> Path:
    """LLaVA-OneVision 7B at reduced depth in the llava-hf layout, with an offline Qwen2 tokenizer and the real
    image processor settings (384 px, 6 x 6 any-resolution grid)."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ppd.embed.vlm import IMAGE_TOKEN, build_tiny_vlm_tokenizer
    from ppd.models.reference import LLAVA_OV_GRID_PINPOINTS, LLAVA_OV_IMAGE_SIZE

    def build(folder: Path) -> None:
        tokenizer = build_tiny_vlm_tokenizer()
        config = llava_onevision_7b_config(
            text_layers=REDUCED_LAYERS,
            vision_layers=REDUCED_LAYERS,
            vocab_size=len(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
        with built_in(_DTYPES[dtype]):
            model = LlavaOnevisionForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        size = LLAVA_OV_IMAGE_SIZE
        LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS
        ).save_pretrained(folder)
        processor = {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": (size // 14) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "image_token": IMAGE_TOKEN,
            "video_token": "<video>",
        }
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))

    return _save_once(workdir / f"llava-onevision-qwen2-7b-{dtype}", build)


def reward_directories(workdir: Path) -> dict[str, Path]:
    """CLIP ViT-H/14 (PickScore, CLIP score, HPSv2 share it) and ViT-L/14 + the aesthetic head, reduced depth."""
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ppd.eval.image_rewards import AESTHETIC_HEAD_FILE, AestheticHead

    def clip_folder(make_config) -> Callable[[Path], None]:
        def build(folder: Path) -> None:
            tokenizer, ids = _tiny_clip_tokenizer_and_ids()
            config = make_config(layers=REDUCED_LAYERS)
            config.text_config.update(ids)
            model = CLIPModel(config)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
                folder
            )
            if config.projection_dim == 768:  # the aesthetic head reads CLIP ViT-L/14's 768-d image embedding
                head = AestheticHead(config.projection_dim)
                save_file({k: v.contiguous() for k, v in head.state_dict().items()}, folder / AESTHETIC_HEAD_FILE)

        return build

    return {
        "vit_h14": _save_once(workdir / "clip-vit-h-14", clip_folder(clip_vit_h14_config)),
        "vit_l14": _save_once(workdir / "clip-vit-l-14", clip_folder(clip_vit_l14_config)),
    }
