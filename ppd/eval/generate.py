"""Image generation for evaluation: one model variant (the base, or the base + one trained adapter) at a time."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cachetools import LRUCache

from ppd.config import PPDConfig
from ppd.data.images import png_bytes
from ppd.errors import InputDataError
from ppd.eval.image_rewards import load_image_rewards, score_images
from ppd.eval.report import image_grid
from ppd.eval.rewards import to_uint8_images
from ppd.models.checkpoint import load_adapter, read_adapter_checkpoint, read_adapter_meta
from ppd.models.factory import build_personalized_stage_c, latent_shape, load_caption_encoder, load_decoder
from ppd.sample import generate_images
from ppd.train.step import population_user_embedding


class VariantGenerator:
    """Generates images for (caption, seed, user embedding) rows with one model variant; models loaded once, on the
    GPU when the process has one."""

    def __init__(
        self,
        cfg: PPDConfig,
        adapter_dir: str | Path | None,
        device: str | None = None,
        caption_cache_size: int | None = None,
    ) -> None:
        # None = this process's GPU when it has one (a Ray actor or Serve replica given num_gpus), else the CPU.
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.cfg = cfg
        # None = keep every caption (evaluation's fixed set); a server bounds it (captions come from clients).
        self.caption_cache_size = caption_cache_size
        if adapter_dir is None:
            self.method, embedding_shape = None, (1, 1)  # the base: the adapter is built but never switched on
        else:
            meta, _ = read_adapter_checkpoint(adapter_dir)
            self.method, embedding_shape = meta.train_method, meta.embedding_shape
        self.embedding_shape = embedding_shape
        self.model = build_personalized_stage_c(cfg.model, embedding_shape, device).eval()
        if adapter_dir is not None:
            load_adapter(self.model, adapter_dir, architecture=cfg.model.architecture)
        self.encoder = load_caption_encoder(cfg.model, device)
        self.decoder = load_decoder(cfg.model, device)
        self.latent_shape = latent_shape(cfg.model)
        self._captions: MutableMapping[str, tuple[torch.Tensor, torch.Tensor]] = (
            {} if caption_cache_size is None else LRUCache(maxsize=caption_cache_size)
        )

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states ([B, S, C_t], [B, 1, C_t]) of `captions`; each distinct caption is encoded once per model
        (while it stays in a bounded cache: the least recently used caption goes first)."""
        known = {c: self._captions[c] for c in dict.fromkeys(captions) if c in self._captions}
        missing = sorted(set(captions) - known.keys())
        if missing:
            hidden, pooled = self.encoder.encode_captions(missing)
            for i, caption in enumerate(missing):
                known[caption] = self._captions[caption] = (hidden[i], pooled[i])
        hidden = torch.stack([known[c][0] for c in captions])  # [B, S, C_t]
        pooled = torch.stack([known[c][1] for c in captions])  # [B, 1, C_t]
        return hidden, pooled

    def generate(
        self,
        captions: list[str],
        seeds: list[int],
        user_embeddings: np.ndarray | torch.Tensor | None = None,
        user_scale: float | Sequence[float] | torch.Tensor | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> np.ndarray:
        """uint8 images [B, H, W, 3], one seed per row.

        `user_embeddings` [B, L, d] condition a ppd / sft adapter (the base ignores them, a dpo adapter conditions on
        its one population user instead); `user_scale` is s for every row or per row [B] (default: the config's;
        s = 0 on a row is exactly the base model there); `steps` and `guidance` default to the evaluation's."""
        hidden, pooled = self.encode_captions(captions)
        users = None
        if self.method == "dpo":
            users = population_user_embedding(len(captions), self.embedding_shape)  # Diffusion-DPO's only "user"
        elif self.method is not None:
            if user_embeddings is None:
                raise ValueError(f"a {self.method} adapter needs user embeddings [B, L, d]")
            users = torch.as_tensor(np.asarray(user_embeddings, dtype=np.float32))  # [B, L, d]
        if user_scale is None:
            user_scale = self.cfg.model.user_scale
        elif not isinstance(user_scale, float | int):
            user_scale = torch.as_tensor(user_scale, dtype=torch.float32)  # [B]
        images = generate_images(
            self.model,
            self.decoder,
            hidden,
            pooled,
            seeds=seeds,
            latent_shape=self.latent_shape,
            user_embedding=users,
            user_scale=user_scale,
            steps=self.cfg.eval.inference_steps if steps is None else steps,
            guidance=self.cfg.eval.guidance if guidance is None else guidance,
            unconditional_text=self.encoder.unconditional_text(),
        )
        return to_uint8_images(images)


def user_grid_rows(
    generator: VariantGenerator, captions: list[str], users: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """One model variant's sample grid as rows of uint8 images [K, H, W, 3]: "base" (s = 0: the base model), then
    one row per user ({label: embedding [L, d]}); a column per caption, generated with seed = column index."""
    seeds = list(range(len(captions)))
    any_user = next(iter(users.values()), np.zeros(generator.embedding_shape, np.float32))  # s = 0: never read

    def each_column(embedding: np.ndarray) -> np.ndarray:
        return np.repeat(np.asarray(embedding, np.float32)[None], len(captions), axis=0)  # [K, L, d]

    rows = {"base": generator.generate(captions, seeds, each_column(any_user), user_scale=0.0)}
    for label, embedding in users.items():
        rows[label] = generator.generate(captions, seeds, each_column(embedding))
    return rows


def user_grid(generator: VariantGenerator, captions: list[str], users: dict[str, np.ndarray], path: Path) -> Path:
    """`user_grid_rows` drawn as a labelled grid (`ppd.eval.report.image_grid`) saved to `path`."""
    rows = user_grid_rows(generator, captions, users)
    return image_grid(list(rows.values()), list(rows), captions, path)


def check_user_embeddings(requests: Sequence[dict], adapters: Mapping[str, str | Path]) -> None:
    """Before any image is drawn: every request of a ppd / sft variant carries a user embedding of the shape its
    adapter reads (a dpo adapter reads none: it conditions on its one population user; the base on none).

    An adapter evaluated on embeddings of another embedder than the one it was trained with would otherwise stop the
    evaluation in a generation worker, after its model loads, with a stack trace."""
    wanted: dict[str, tuple[tuple[int, int], str]] = {}
    for variant, folder in adapters.items():
        meta = read_adapter_meta(folder)
        if meta.train_method in ("ppd", "sft"):
            wanted[variant] = (meta.embedding_shape, meta.train_method)
    carried: dict[str, set] = {}
    for request in requests:
        if request["variant"] in wanted:
            shape = request.get("embedding_shape")
            carried.setdefault(request["variant"], set()).add(None if shape is None else tuple(int(n) for n in shape))
    for variant, shapes in carried.items():
        expected, method = wanted[variant]
        wrong = shapes - {expected}
        if not wrong:
            continue
        found = ", ".join("none" if s is None else str(list(s)) for s in sorted(wrong, key=str))
        hint = (
            "give each of its requests a user embedding"
            if None in wrong
            else "embeddings of another embedder than the one it was trained with?"
        )
        raise InputDataError(
            f"variant {variant!r}: its {method} adapter ({adapters[variant]}) reads user embeddings [L, d] = "
            f"{list(expected)}, the requests carry {found}: {hint}"
        )


def distinct_images(requests: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """Generation requests that draw the same image, made once.

    A row's image is a function of its variant, caption, seed and user embedding alone (one noise generator per row:
    `ppd.sample`; the batch it shares changes at most a pixel's grey level through CPU kernels' rounding), so two
    requests that agree on those ask for the same image. The evaluation repeats many (the base's image of a held-out
    caption is wanted once per population user who holds that caption: 742 requests, 56 distinct images, in the
    demo's evaluation). Returns the first request of each distinct image, in order, and, for every request, the
    `request_id` of the request whose image it gets."""
    first: dict[tuple, int] = {}
    distinct: list[dict] = []
    sources: list[int] = []
    for request in requests:
        embedding, shape = request.get("embedding"), request.get("embedding_shape")
        key = (
            request["variant"],
            request["caption"],
            int(request["seed"]),
            None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes(),
            None if shape is None else tuple(int(n) for n in shape),
        )
        if key not in first:
            first[key] = int(request["request_id"])
            distinct.append(request)
        sources.append(first[key])
    return distinct, sources


class GenerationStage:
    """A batch stage (a Ray Data actor in the evaluate and sweep jobs): request rows -> PNG images + image rewards.

    Loads each variant's model once (`adapters`: variant -> adapter folder; "base" = no adapter). Rows carry
    variant, caption, seed, request_id and an optional flattened user embedding with its shape."""

    def __init__(self, config: dict, adapters: dict[str, str]) -> None:
        self.cfg = PPDConfig.from_dict(config)
        self.adapters = adapters
        self.generators: dict[str, VariantGenerator] = {}
        # Real-image rewards (CLIP score, aesthetic, HPSv2): loaded once per actor, applied to every image made here,
        # on the actor's GPU when it has one (as the generators).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.image_rewards = load_image_rewards(self.cfg.eval, self.cfg.model.cache_dir, device=device)

    def _generator(self, variant: str):
        if variant not in self.generators:
            self.generators[variant] = VariantGenerator(self.cfg, None if variant == "base" else self.adapters[variant])
        return self.generators[variant]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """request_id, png and one `image_reward.<name>` column per real-image reward, for every row."""
        pngs: dict[int, bytes] = {}
        reward_scores: dict[str, dict[int, float]] = {name: {} for name in self.image_rewards}
        for variant, rows in batch.groupby("variant", sort=False):
            embeddings = None
            if rows["embedding"].notna().all():
                embeddings = np.stack(
                    [
                        np.asarray(e, np.float32).reshape(s)
                        for e, s in zip(rows["embedding"], rows["embedding_shape"], strict=True)
                    ]
                )
            images = self._generator(variant).generate(rows["caption"].tolist(), rows["seed"].tolist(), embeddings)
            for name, values in score_images(self.image_rewards, images, rows["caption"].tolist()).items():
                reward_scores[name].update(zip(rows["request_id"].astype(int), values.tolist(), strict=True))
            for request_id, image in zip(rows["request_id"], images, strict=True):
                pngs[int(request_id)] = png_bytes(image)
        ids = batch["request_id"].astype(int).tolist()
        columns = {f"image_reward.{name}": [scores[i] for i in ids] for name, scores in reward_scores.items()}
        return pd.DataFrame({"request_id": ids, "png": [pngs[i] for i in ids], **columns})
