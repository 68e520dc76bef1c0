"""Pure logic of the precompute job: images -> Stage C latents, captions -> text states, pairs -> user embeddings.

Training never decodes an image or runs an encoder: everything a step needs is computed here once.

- Latents: PNG/JPEG bytes are decoded to [-1, 1] RGB and encoded by a `LatentEncoder` (the lossless toy codec for
  the tiny architecture; Stable Cascade's EfficientNet encoder, `ppd.models.effnet`, for the real ones), ordered
  winner / loser by the pair's `preferred`.
- Captions: every distinct caption is encoded once into a caption table; pairs keep an index into it.
- User embeddings: a pair is conditioned on its `condition_group_id` (a few-shot group of the same user that does not
  contain the pair, chosen by the preparation job). Pairs without such a group, or whose group has no embedding,
  are counted and left out; an embedding stored under another user is a broken input, not a skipped pair.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ppd.config import ModelConfig
from ppd.errors import InputDataError
from ppd.models.codec import ToyCodec
from ppd.models.effnet import EFFNET_DOWNSAMPLING
from ppd.models.stage_c import TOY_CODEC_FACTOR

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Why a prepared pair is not in the precomputed training set (counted per split in the manifest).
SKIP_REASONS: tuple[str, ...] = ("no_condition_group", "no_embedding", "undecodable_image")


# What the join needs of a prepared pair (no images: those are streamed by the job).
PAIR_METADATA_COLUMNS: tuple[str, ...] = ("pair_id", "user_id", "caption", "condition_group_id")


def read_pair_metadata(prepared: Path, splits: Sequence[str]) -> pd.DataFrame:
    """pair_id, split, user_id, caption, condition_group_id of every prepared pair in `splits` (no images).

    `prepared` is the preparation job's output folder (one sub-folder of parquet files per split); a split with no
    files is skipped, except `train`, whose absence means `prepared` is not such a folder (`InputDataError`)."""
    frames = []
    for split in splits:
        files = sorted((prepared / split).glob("*.parquet"))
        if not files:
            if split == "train":
                raise InputDataError(
                    f"{prepared}/train has no parquet files: is {prepared} the output of `ppd prepare`?"
                )
            logger.info(f"{prepared}/{split}: no rows, skipped")
            continue
        try:
            table = pq.read_table(files, columns=list(PAIR_METADATA_COLUMNS))
        except (pa.ArrowInvalid, KeyError) as err:
            raise InputDataError(f"{prepared}/{split}: not a prepared split ({err})") from None
        frames.append(table.to_pandas().assign(split=split))
    return pd.concat(frames, ignore_index=True)


class LatentEncoder(Protocol):
    """Images [B, 3, H, W] in [-1, 1] -> Stage C latents [B, C, h, w]."""

    image_size: int  # side the images are brought to before encoding
    resize: bool  # False: an image of another size is rejected, not resampled

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ToyLatentEncoder:
    """The toy world's lossless codec: fs x fs RGB -> 3f² x s x s latents (no resampling: sizes must match)."""

    image_size: int
    resize: bool = False

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return ToyCodec(TOY_CODEC_FACTOR).encode(images)  # [B, 3f², H/f, W/f]


def load_latent_encoder(cfg: ModelConfig, device: torch.device | str | None = None) -> LatentEncoder:
    """The image encoder whose latents Stage C of `cfg` was trained on (real ones on `device`: default a GPU if any)."""
    if cfg.architecture == "tiny":
        return ToyLatentEncoder(image_size=cfg.latent_size * TOY_CODEC_FACTOR)
    # Real Stable Cascade: the 16-channel features of its EfficientNetV2-S encoder (768 px -> 16 x 24 x 24), from
    # `effnet_encoder.safetensors` of stabilityai/stable-cascade (or `cfg.effnet_path`), in the model's dtype.
    from ppd.models.effnet import EffnetLatentEncoder, load_effnet_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_effnet_encoder(cfg.effnet_path, dtype=_DTYPES[cfg.dtype], device=device)
    return EffnetLatentEncoder(encoder, image_size=cfg.latent_size * EFFNET_DOWNSAMPLING)


def decode_image(data: bytes | None, image_size: int, resize: bool) -> torch.Tensor | None:
    """PNG/JPEG bytes -> RGB [3, S, S] in [-1, 1] (S = image_size), or None when undecodable or of the wrong size.

    With `resize`, the shorter side is brought to S (bilinear, antialiased) and the centre S x S is cut out, as
    Stable Cascade's training transforms do; without it an image of another size is rejected."""
    try:
        with Image.open(io.BytesIO(data or b"")) as image:
            rgb = image.convert("RGB")
    except Exception:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, ...
        return None
    if rgb.size != (image_size, image_size):
        if not resize:
            return None
        rgb = _resize_and_centre_crop(rgb, image_size)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # [S, S, 3]
    return pixels.permute(2, 0, 1).float() / 127.5 - 1  # [3, S, S]


def _resize_and_centre_crop(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    scale = side / min(width, height)
    resized = image.resize(
        (max(side, round(width * scale)), max(side, round(height * scale))), Image.Resampling.BILINEAR
    )
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    return resized.crop((left, top, left + side, top + side))


@dataclass(frozen=True)
class PairLatents:
    """Latents of the pairs whose images both decoded; `kept` marks which input rows those are."""

    latents_win: torch.Tensor  # [K, C, h, w]
    latents_lose: torch.Tensor  # [K, C, h, w]
    kept: np.ndarray  # [B] bool, K = kept.sum()


@torch.no_grad()
def encode_pairs(
    jpg_0: Sequence[bytes], jpg_1: Sequence[bytes], preferred: Sequence[int], encoder: LatentEncoder
) -> PairLatents:
    """Decode and encode both images of each pair; the user preferred jpg_1 where `preferred` is 1."""
    images_0 = [decode_image(data, encoder.image_size, encoder.resize) for data in jpg_0]
    images_1 = [decode_image(data, encoder.image_size, encoder.resize) for data in jpg_1]
    kept = np.array([a is not None and b is not None for a, b in zip(images_0, images_1, strict=True)], dtype=bool)
    choice = np.asarray(preferred, dtype=np.int64)[kept]
    if not kept.any():
        empty = torch.empty(0)
        return PairLatents(empty, empty, kept)
    first = torch.stack([image for image, keep in zip(images_0, kept, strict=True) if keep])  # [K, 3, S, S]
    second = torch.stack([image for image, keep in zip(images_1, kept, strict=True) if keep])  # [K, 3, S, S]
    latents = encoder.encode(torch.cat([first, second])).float().cpu()  # [2K, C, h, w]
    latents_0, latents_1 = latents.chunk(2)
    prefers_1 = torch.from_numpy(choice == 1).view(-1, 1, 1, 1)  # [K, 1, 1, 1]
    return PairLatents(
        latents_win=torch.where(prefers_1, latents_1, latents_0),
        latents_lose=torch.where(prefers_1, latents_0, latents_1),
        kept=kept,
    )


def caption_index(captions: Sequence[str]) -> dict[str, int]:
    """Each distinct caption -> its row in the caption table (sorted order: the same captions give the same table)."""
    return {caption: index for index, caption in enumerate(sorted(set(captions)))}


@dataclass(frozen=True)
class EmbeddingIndex:
    """Which few-shot groups have a usable embedding, and their row in the user-embedding table."""

    table: pd.DataFrame  # embedding_index, group_id, user_id (one row per group used by a training pair)
    embedding_shape: tuple[int, int]  # [L, d]


def join_training_rows(
    pairs: pd.DataFrame,
    embeddings: Mapping[tuple[int, int], np.ndarray | tuple[int, ...]],
    captions: Mapping[str, int],
    order_seed: int,
) -> tuple[pd.DataFrame, EmbeddingIndex, dict[str, dict[str, int]]]:
    """Join pairs (pair_id, split, user_id, caption, condition_group_id) to caption rows and group embeddings.

    `embeddings` is {(user_id, group_id): [L, d] array, or just its shape}: the join needs the keys and shapes only
    (`ppd.embed.store.read_embedding_catalog`, so the vectors can be streamed afterwards). Returns the trainable pairs
    with caption_index, embedding_index and a seeded random `order_key` (the training order within a split), the
    index of the embedding rows they use (one table for all splits), and {split: {reason: pairs left out}}.
    Raises ValueError on inconsistent inputs: a group's embedding stored under another user, embeddings of
    different shapes, a caption missing from `captions`.
    """
    owner_of_group = {group_id: user_id for user_id, group_id in embeddings}
    shapes = {
        tuple(np.shape(value)) if isinstance(value, np.ndarray) else tuple(value) for value in embeddings.values()
    }
    if len(shapes) > 1:
        raise ValueError(f"user embeddings of different shapes {sorted(shapes)}: use one embedder's output")
    pairs = pairs.sort_values("pair_id").reset_index(drop=True)
    splits = sorted(set(pairs["split"]))
    skipped = {split: dict.fromkeys(SKIP_REASONS, 0) for split in splits}

    has_group = pairs["condition_group_id"].notna()
    _count(skipped, pairs[~has_group], "no_condition_group")
    pairs = pairs[has_group].astype({"condition_group_id": "int64"})
    group_owner = pairs["condition_group_id"].map(owner_of_group)
    wrong_owner = group_owner.notna() & (group_owner != pairs["user_id"])
    if wrong_owner.any():
        row = pairs[wrong_owner].iloc[0]
        raise ValueError(
            f"pair {row.pair_id} of user {row.user_id} is conditioned on group {row.condition_group_id}, but the "
            f"embeddings hold that group for user {owner_of_group[row.condition_group_id]}: the embeddings were made "
            "from another preparation of the data"
        )
    has_embedding = group_owner.notna()
    _count(skipped, pairs[~has_embedding], "no_embedding")
    pairs = pairs[has_embedding].reset_index(drop=True)
    missing_captions = sorted(set(pairs["caption"]) - set(captions))
    if missing_captions:
        raise ValueError(f"{len(missing_captions)} caption(s) have no caption-table row, e.g. {missing_captions[0]!r}")

    used_groups = sorted(set(pairs["condition_group_id"]))
    index_table = pd.DataFrame(
        {
            "embedding_index": np.arange(len(used_groups), dtype=np.int64),
            "group_id": np.asarray(used_groups, dtype=np.int64),
            "user_id": np.asarray([owner_of_group[g] for g in used_groups], dtype=np.int64),
        }
    )
    row_of_group = dict(zip(used_groups, range(len(used_groups)), strict=True))
    # A seeded permutation of the pairs sorted by id: batches mix users and captions, and the order is reproducible.
    order_key = np.random.default_rng(order_seed).permutation(len(pairs)).astype(np.int64)
    joined = pd.DataFrame(
        {
            "pair_id": pairs["pair_id"].astype("int64"),
            "split": pairs["split"].astype(str),
            "user_id": pairs["user_id"].astype("int64"),
            "caption_index": pairs["caption"].map(captions).astype("int64"),
            "embedding_index": pairs["condition_group_id"].map(row_of_group).astype("int64"),
            "condition_group_id": pairs["condition_group_id"].astype("int64"),
            "order_key": order_key,
        }
    )
    embedding_shape = next(iter(shapes)) if shapes else (0, 0)
    return joined, EmbeddingIndex(index_table, embedding_shape), skipped


def _count(skipped: dict[str, dict[str, int]], rows: pd.DataFrame, reason: str) -> None:
    for split, count in rows["split"].value_counts().items():
        skipped[str(split)][reason] += int(count)


def embedding_rows(
    index: EmbeddingIndex, embeddings: Mapping[tuple[int, int], np.ndarray], start: int, stop: int
) -> torch.Tensor:
    """Rows [start, stop) of the user-embedding table: float32 [stop - start, L, d] in embedding_index order."""
    rows = index.table.iloc[start:stop]
    stacked = [embeddings[(int(u), int(g))] for u, g in zip(rows["user_id"], rows["group_id"], strict=True)]
    return torch.from_numpy(np.stack(stacked).astype(np.float32, copy=False))
