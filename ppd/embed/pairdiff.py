"""Pair-difference user embeddings: one token φ(x+) − φ(x−) per preference pair, with a frozen image encoder φ.

A cheap, strong baseline beside the VLM (DESIGN.md section 3): no generation, one batched image-encoder pass. φ is
a CLIP vision tower with its projection (`CLIPVisionModelWithProjection.image_embeds`, L2-normalised, as CLIP
compares images): the real one on real data (`embed.image_encoder_path`, e.g. openai/clip-vit-large-patch14), a tiny
one with random weights from a fixed seed on the toy world, built once and loaded through the same
`from_pretrained(path)`. A random vision transformer is a random-feature map of the pixels: on the toy world's
population a linear read-out of one pair's token recovers its difference in brightness and warmth (R² ~0.9),
saturation and size in part (~0.5 / ~0.35), centredness not at all (`scripts/population_diagnostics.py`).

The embedder reads only images and the user's choices, never the toy world's hidden rewards. The embedding is
float32 [N, d] with N = pairs in the group (L = N in the row contract; `layers` is empty). The pairs of a group are
exchangeable, so consumers should treat the N tokens as a set (the classifier averages them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ppd.config import EmbedConfig
from ppd.embed import prompt as cot
from ppd.embed.base import Embedder, EmbeddingIdentity, EmbeddingRow, quiet_progress_bars
from ppd.embed.groups import FewShotGroup
from ppd.models.local_cache import build_once

# The toy world's image side (`data.toy.image_size`): the encoder sees its pixels without resampling. At 16 px (the
# toy world's earlier side) the processor halved every 32 px image first; on seed 0's population the user classifier
# read top-16 3.06x / 2.50x chance from 16 px towers of two init seeds, 3.25x / 3.44x from 32 px ones.
TINY_CLIP_IMAGE_SIZE = 32
# The cache folder names the input side: a tower built at another side must not be picked up from an old cache.
TINY_CLIP_VISION_NAME = f"tiny-clip-vision-{TINY_CLIP_IMAGE_SIZE}px"
TINY_CLIP_VISION_SEED = 0
# What the embedding is, versioned like the VLM prompt: a change here must not mix with older embeddings.
RECIPE = (
    f"pairdiff-v2: l2-normalised CLIP image_embeds ({TINY_CLIP_IMAGE_SIZE} px tiny tower unless a real one is given), "
    "chosen minus rejected, one token per pair"
)


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """A 32 px / patch 4 / width 64, 2-layer CLIP vision tower with a 64-d projection (~0.1M parameters)."""
    return CLIPVisionConfig(
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=64,
    )


def tiny_clip_vision_dir(cache_dir: str | Path) -> Path:
    """Directory of the tiny CLIP vision tower (config, safetensors, preprocessor), built on first use."""

    def build(scratch: Path) -> None:
        with torch.random.fork_rng(devices=[]), quiet_progress_bars():
            torch.manual_seed(TINY_CLIP_VISION_SEED)
            CLIPVisionModelWithProjection(tiny_clip_vision_config()).save_pretrained(scratch)
        size = TINY_CLIP_IMAGE_SIZE
        CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            scratch
        )

    return build_once(Path(cache_dir) / TINY_CLIP_VISION_NAME, "config.json", build)


def resolve_image_encoder_path(cfg: EmbedConfig, cache_dir: str | Path) -> tuple[str, str]:
    """(path to load, model_id stored with the embeddings): `cfg.image_encoder_path` or the tiny local tower."""
    if cfg.image_encoder_path is None:
        return str(tiny_clip_vision_dir(cache_dir)), TINY_CLIP_VISION_NAME
    return cfg.image_encoder_path, cfg.image_encoder_path


class PairDiffEmbedder(Embedder):
    """Few-shot groups -> [N, d] tokens φ(x+) − φ(x−), one per pair, in the group's pair order."""

    name = "pairdiff"

    def __init__(self, path: str, model_id: str, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(path).to(self.device).eval()
        self.image_processor = CLIPImageProcessorPil.from_pretrained(path)
        self.identity = self.identity_for(model_id)

    @classmethod
    def identity_for(cls, model_id: str) -> EmbeddingIdentity:
        """Pair tokens, no layers; the recipe's hash stands in the prompt_hash column (there is no prompt)."""
        return EmbeddingIdentity(cls.name, model_id, cot.prompt_hash((RECIPE,)), (), {"recipe": RECIPE})

    def _decode(self, group: FewShotGroup):
        return group.chosen_and_rejected()

    @torch.inference_mode()
    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> L2-normalised image embeddings [n, d]."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # [n, 3, H, W]
        embeds = self.encoder(pixel_values=pixels.to(self.device, self.encoder.dtype)).image_embeds  # [n, d]
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    def _embed_decoded(self, groups: list[FewShotGroup], decoded: list) -> list[EmbeddingRow]:
        chosen = [image for pair_chosen, _ in decoded for image in pair_chosen]
        rejected = [image for _, pair_rejected in decoded for image in pair_rejected]
        both = self.encode_images(chosen + rejected)  # one pass over every image of the batch: [2P, d]
        differences = (both[: len(chosen)] - both[len(chosen) :]).cpu().numpy()  # [P, d], P = pairs in the batch
        rows, start = [], 0
        for group in groups:
            n = len(group.pair_ids)
            rows.append(self._row(group, differences[start : start + n]))  # [N, d]
            start += n
        return rows
