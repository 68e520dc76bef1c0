"""Stage 1: few-shot preference groups -> user embeddings float32 [L, d] (DESIGN.md section 3).

    embedder = load_embedder(cfg)                  # the model is loaded once
    rows = embedder.embed_groups(groups)           # FewShotGroup list -> EmbeddingRow list (error rows included)
    table = read_embeddings(out_dir)               # stored rows -> {(user_id, group_id): [L, d] array}

Backends: `vlm-hf` (transformers generate + forward, the reference), `vlm-vllm` (vLLM generation, the same forward),
`pairdiff` (frozen image encoder, one φ(x+) − φ(x−) token per pair). Heavy dependencies are imported inside the
functions: `ppd.embed.torchvision_compat` is imported at interpreter start (see its docstring), so this package's
`__init__` must stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from ppd.config import PPDConfig
    from ppd.embed.base import Embedder, EmbeddingIdentity


def load_embedder(cfg: PPDConfig, device: str | None = None) -> Embedder:
    """The embedder named by `cfg.embed.embedder`, its model loaded once (tiny local models when no path is set)."""
    embed = cfg.embed
    if embed.embedder == "pairdiff":
        from ppd.embed.pairdiff import PairDiffEmbedder, resolve_image_encoder_path

        path, model_id = resolve_image_encoder_path(embed, cfg.model.cache_dir)
        return PairDiffEmbedder(path, model_id, device=device)
    import torch

    from ppd.embed.vlm import HFVLMEmbedder, resolve_vlm_path

    path, model_id = resolve_vlm_path(embed, cfg.model.cache_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[embed.dtype]
    if embed.embedder == "vlm-hf":
        return HFVLMEmbedder(path, model_id, embed, device=device, dtype=dtype)
    from ppd.embed.vllm_backend import VLLMEmbedder

    return VLLMEmbedder(path, model_id, embed, device=device, dtype=dtype)


def embedding_identity(cfg: PPDConfig) -> EmbeddingIdentity:
    """What `load_embedder(cfg)` would stamp on its rows, from configs only (no weights loaded)."""
    embed = cfg.embed
    if embed.embedder == "pairdiff":
        from ppd.embed.pairdiff import PairDiffEmbedder, resolve_image_encoder_path

        return PairDiffEmbedder.identity_for(resolve_image_encoder_path(embed, cfg.model.cache_dir)[1])
    from transformers import AutoConfig

    from ppd.embed.vlm import HFVLMEmbedder, resolve_vlm_path

    path, model_id = resolve_vlm_path(embed, cfg.model.cache_dir)
    backend = HFVLMEmbedder
    if embed.embedder == "vlm-vllm":
        from ppd.embed.vllm_backend import VLLMEmbedder

        backend = VLLMEmbedder
    return backend.identity_for(embed, model_id, AutoConfig.from_pretrained(path))


def read_embeddings(path: str | Path, **filters) -> dict[tuple[int, int], np.ndarray]:
    """Stored rows -> {(user_id, group_id): float32 [L, d]}; see `ppd.embed.store.read_embeddings`."""
    from ppd.embed.store import read_embeddings as read

    return read(path, **filters)
