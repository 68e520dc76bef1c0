"""Reward models for real images (DESIGN.md section 7): CLIP score, LAION aesthetic predictor, HPSv2.

Every reward has one interface, `score(images uint8 [B, H, W, 3], captions) -> float64 [B]`, and is built once (per
Ray actor) by `load_image_rewards(cfg.eval, cache_dir)`. Images are resized by the CLIP image processor saved in the
model's own folder, so the pixels each model sees are the ones it was trained on.

Checkpoints are folders in transformers' CLIP format with safetensors weights; `from_pretrained` is called with
`use_safetensors=True`, so a folder holding only a pickled `pytorch_model.bin` is refused instead of unpickled.
With a path left at None the reward runs on a tiny CLIP with random weights built locally (fixed seed): for tests and
the toy world, where the numbers mean nothing but every line of the scoring path runs.

- CLIP score: 100 * max(cos(image, caption), 0) with a CLIP model (as torchmetrics' CLIPScore; the paper's setting
  is OpenCLIP ViT-H/14, published in transformers format as `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
- Aesthetic: the LAION "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE): a linear MLP head
  768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the L2-normalised CLIP ViT-L/14 image embedding (`openai/clip-vit-large-patch14`).
  The head is read from safetensors only. Convert the public `.pth` once, outside this load path, on a trusted machine:

      import torch, safetensors.torch
      state = torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
      safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, "aesthetic_head.safetensors")

  The keys stay the public module's (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`: the Dropouts sit
  between), which `AestheticHead` mirrors.
- PickScore (the paper's validation metric for choosing beta): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic
  (`yuvalkirstain/PickScore_v1`, processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`);
  score = exp(logit_scale) * cos(image, caption), unclipped, as its authors compute it.
- HPSv2: an OpenCLIP ViT-H/14 fine-tuned on human preferences; score = 100 * cos(image, caption), unclipped. open_clip
  is not part of this stack, so the checkpoint must be HPSv2 converted to transformers' `CLIPModel` format (the
  ViT-H/14 architecture of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` with HPSv2's weights); the conversion is a
  one-time key renaming done outside this load path, like the aesthetic head's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ppd.config import EvalConfig
from ppd.embed.base import quiet_progress_bars
from ppd.models.local_cache import build_once
from ppd.models.text import build_tiny_clip_tokenizer, tiny_clip_text_config

IMAGE_REWARDS: tuple[str, ...] = ("pickscore", "clip_score", "aesthetic", "hps")
AESTHETIC_HIDDEN: tuple[int, ...] = (1024, 128, 64, 16)  # the public LAION predictor's widths after the input
AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"
TINY_CLIP_REWARD_NAME = "tiny-clip-reward"
TINY_CLIP_REWARD_SEED = 0
TINY_CLIP_REWARD_IMAGE_SIZE = 32  # px; toy images (16 px) are resized up, as real images are resized to 224


class ImageReward(Protocol):
    """A reward model for generated images."""

    name: str

    def score(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """uint8 images [B, H, W, 3] and their captions -> float64 scores [B]."""
        ...


def _check_batch(images: np.ndarray, captions: Sequence[str] | None = None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")


def _pixel_values(processor: CLIPImageProcessorPil, images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised pixels [B, 3, S, S] at the model's resolution (resize + centre crop)."""
    batch = processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
    return batch["pixel_values"]


def _require_safetensors(path: Path) -> None:
    # The only weights this module reads from a single file; a pickle (.pth/.pt/.bin/.ckpt) is never opened.
    if path.suffix != ".safetensors":
        raise ValueError(
            f"refusing to load {path}: weights are read from .safetensors only (no unpickling); "
            "convert the file once outside this load path (see ppd.eval.image_rewards)"
        )


@contextmanager
def _quiet_loading():
    # No progress bars, and no load report listing the text tower's keys when only the vision tower is read out of a
    # full CLIPModel folder; weights that matter are checked by `_from_pretrained` instead.
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with quiet_progress_bars():
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _from_pretrained(model_class, path: str):
    """`model_class.from_pretrained(path)` from safetensors only; weights missing from the checkpoint are an error.

    A converted checkpoint (HPSv2) whose key names are off by a prefix would otherwise load as a randomly initialised
    model and score noise without a word.
    """
    with _quiet_loading():
        model, info = model_class.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    problems = {k: sorted(info[k]) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise ValueError(f"{path} does not fit {model_class.__name__}: {problems}")
    return model.eval()


class ClipSimilarityReward:
    """scale * cos(CLIP image embedding, CLIP caption embedding): the CLIP score (100, clipped at 0), HPSv2 (100,
    unclipped) and PickScore (the model's own exp(logit_scale), unclipped)."""

    def __init__(
        self,
        name: str,
        path: str,
        clip_at_zero: bool,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        scale: float | None = 100.0,
        processor_path: str | None = None,
    ) -> None:
        self.name = name
        self.clip_at_zero = clip_at_zero
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model = _from_pretrained(CLIPModel, path).to(self.device)
        # None: the model's learned temperature (PickScore's definition), read once.
        self.scale = float(self.model.logit_scale.detach().exp()) if scale is None else scale
        with _quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(processor_path or path)
            self.processor = CLIPImageProcessorPil.from_pretrained(processor_path or path)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """uint8 images [B, H, W, 3] and their captions -> float64 [B]."""
        _check_batch(images, captions)
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            pixels = _pixel_values(self.processor, images[start:stop]).to(self.device)  # [b, 3, S, S]
            # Captions longer than the text tower's positions are truncated, as every CLIP-score implementation does.
            tokens = self.tokenizer(
                list(captions[start:stop]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            image_embeds = _unit(self.model.get_image_features(pixel_values=pixels))  # [b, D]
            text_embeds = _unit(self.model.get_text_features(**tokens))  # [b, D]
            cosine = (image_embeds * text_embeds).sum(-1)  # [b]
            scores.append(self.scale * (cosine.clamp(min=0) if self.clip_at_zero else cosine))
        return torch.cat(scores).double().cpu().numpy() if scores else np.zeros(0)


def _unit(features) -> torch.Tensor:
    # transformers >= 5 may return a model output object from get_*_features; its pooled projection is the embedding.
    embeds = features if isinstance(features, torch.Tensor) else features.pooler_output
    return embeds / embeds.norm(dim=-1, keepdim=True)


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP, layer for layer (no activations: the public predictor is linear end to end)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        widths = (input_dim, *AESTHETIC_HIDDEN)
        self.layers = nn.Sequential(
            nn.Linear(widths[0], widths[1]),
            nn.Dropout(0.2),
            nn.Linear(widths[1], widths[2]),
            nn.Dropout(0.2),
            nn.Linear(widths[2], widths[3]),
            nn.Dropout(0.1),
            nn.Linear(widths[3], widths[4]),
            nn.Linear(widths[4], 1),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(image_embeds).squeeze(-1)  # [B, D] -> [B]


def load_aesthetic_head(path: str | Path, input_dim: int) -> AestheticHead:
    """The head's weights from a safetensors file; a missing, extra or wrongly shaped tensor is a ValueError."""
    path = Path(path)
    _require_safetensors(path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read aesthetic head {path}: {err}") from None
    head = AestheticHead(input_dim)
    expected = {key: tuple(value.shape) for key, value in head.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if expected != found:
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise ValueError(
            f"aesthetic head {path} does not fit a {input_dim}-d image embedding: "
            f"missing {sorted(expected.keys() - found.keys())}, unexpected {sorted(found.keys() - expected.keys())}, "
            f"wrong shapes {[f'{k}: {found[k]} != {expected[k]}' for k in wrong]}"
        )
    head.load_state_dict(state)
    return head.eval()


class AestheticReward:
    """LAION aesthetic score: the MLP head on the L2-normalised CLIP image embedding (captions are ignored)."""

    name = "aesthetic"

    def __init__(
        self, clip_path: str, head_path: str | Path, batch_size: int = 32, device: str | torch.device = "cpu"
    ) -> None:
        self.batch_size = batch_size
        self.device = torch.device(device)
        # Reads the vision tower and projection out of a full CLIPModel folder as well as a vision-only one.
        self.vision = _from_pretrained(CLIPVisionModelWithProjection, clip_path).to(self.device)
        with _quiet_loading():
            self.processor = CLIPImageProcessorPil.from_pretrained(clip_path)
        self.head = load_aesthetic_head(head_path, self.vision.config.projection_dim).to(self.device)

    @torch.no_grad()
    def score(self, images: np.ndarray, captions: Sequence[str] | None = None) -> np.ndarray:
        """uint8 images [B, H, W, 3] -> float64 [B] (the public predictor's 1-10 scale with the real weights)."""
        _check_batch(images, captions)
        scores = []
        for start in range(0, len(images), self.batch_size):
            pixels = _pixel_values(self.processor, images[start : start + self.batch_size]).to(self.device)
            image_embeds = _unit(self.vision(pixel_values=pixels).image_embeds)  # [b, D]
            scores.append(self.head(image_embeds))  # [b]
        return torch.cat(scores).double().cpu().numpy() if scores else np.zeros(0)


# --- the tiny stand-in --------------------------------------------------------------------------------------------------


def tiny_clip_reward_dir(cache_dir: str | Path) -> Path:
    """A tiny CLIPModel (text + vision, 32-d projection), tokenizer, image processor and aesthetic head, random weights."""

    def build(scratch: Path) -> None:
        with torch.random.fork_rng(devices=[]), quiet_progress_bars():
            torch.manual_seed(TINY_CLIP_REWARD_SEED)
            tokenizer = build_tiny_clip_tokenizer()
            text = tiny_clip_text_config(tokenizer)
            vision = CLIPVisionConfig(
                image_size=TINY_CLIP_REWARD_IMAGE_SIZE,
                patch_size=8,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=text.projection_dim,
            )
            config = CLIPConfig(
                text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=text.projection_dim
            )
            CLIPModel(config).save_pretrained(scratch)
            head = AestheticHead(text.projection_dim)
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, scratch / AESTHETIC_HEAD_FILE)
        tokenizer.save_pretrained(scratch)
        size = TINY_CLIP_REWARD_IMAGE_SIZE
        CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            scratch
        )

    return build_once(Path(cache_dir) / TINY_CLIP_REWARD_NAME, "config.json", build)


def load_image_rewards(
    cfg: EvalConfig, cache_dir: str | Path, device: str | torch.device = "cpu"
) -> dict[str, ImageReward]:
    """The rewards named in `cfg.image_rewards`, each loaded once; a path left at None uses the tiny local CLIP."""
    tiny: Path | None = None

    def path_or_tiny(path: str | None, file: str | None = None) -> str:
        nonlocal tiny
        if path is not None:
            return path
        tiny = tiny or tiny_clip_reward_dir(cache_dir)
        return str(tiny / file) if file else str(tiny)

    rewards: dict[str, ImageReward] = {}
    for name in cfg.image_rewards:
        if name == "pickscore":
            rewards[name] = ClipSimilarityReward(
                name,
                path_or_tiny(cfg.pickscore_path),
                clip_at_zero=False,
                batch_size=cfg.reward_batch_size,
                device=device,
                scale=None,
                processor_path=cfg.pickscore_processor_path,
            )
        elif name == "clip_score":
            rewards[name] = ClipSimilarityReward(
                name,
                path_or_tiny(cfg.clip_score_path),
                clip_at_zero=True,
                batch_size=cfg.reward_batch_size,
                device=device,
            )
        elif name == "hps":
            rewards[name] = ClipSimilarityReward(
                name, path_or_tiny(cfg.hps_path), clip_at_zero=False, batch_size=cfg.reward_batch_size, device=device
            )
        elif name == "aesthetic":
            rewards[name] = AestheticReward(
                path_or_tiny(cfg.aesthetic_clip_path),
                path_or_tiny(cfg.aesthetic_head_path, AESTHETIC_HEAD_FILE),
                batch_size=cfg.reward_batch_size,
                device=device,
            )
        else:  # the config's Literal makes this unreachable; kept so a new name cannot be silently skipped
            raise ValueError(f"unknown image reward {name!r}; known: {IMAGE_REWARDS}")
    return rewards


def score_images(rewards: dict[str, ImageReward], images: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Every reward's scores of uint8 images [B, H, W, 3] with their captions: name -> float64 [B]."""
    return {name: reward.score(images, captions) for name, reward in rewards.items()}
