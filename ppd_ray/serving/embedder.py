"""Embedder deployment: N preference pairs -> user embedding [L, d] + profile, with a content-addressed cache.

The embedder is the one training used (`load_embedder(cfg)` with the same `embed` config). The cache key is the
pairs' content (captions, image bytes, choices, in order) plus the embedder's identity (model id, prompt hash,
layers, settings), so the same pairs never run the model twice and a changed model never serves stale entries.
The cache is per replica (LRU, `serve.embedding_cache_size` entries).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache
from ray import serve

from ppd.config import PPDConfig
from ppd.data.images import png_bytes
from ppd.embed import load_embedder
from ppd.embed.groups import FewShotGroup

Pair = tuple[str, bytes, bytes, int]  # (caption, image_0 bytes, image_1 bytes, preferred 0/1)


@dataclass(frozen=True)
class EmbeddedUser:
    embedding: np.ndarray  # [L, d] float32
    profile: str
    model_id: str
    cached: bool


class EmbeddingFailed(ValueError):
    """The embedder could not embed the pairs (e.g. an image it cannot read): a client error, not a crash."""


class UserEmbedder:
    """Loads the embedder once; `embed(pairs)` returns the user's embedding, from the cache when seen before."""

    def __init__(self, config: dict) -> None:
        cfg = PPDConfig.from_dict(config)
        self.embedder = load_embedder(cfg)
        self.identity = self.embedder.identity
        self.cache_size = cfg.serve.embedding_cache_size
        # None: caching off (serve.embedding_cache_size=0).
        self._cache: LRUCache | None = LRUCache(maxsize=self.cache_size) if self.cache_size else None
        # Serve runs sync methods on a thread pool: one model call at a time, and the cache changes under the lock.
        self._lock = threading.Lock()
        # One warm-up group: the first request does not pay for lazy initialisation, and the shape is known at start.
        self.embedding_shape = list(self._run(_warmup_pairs(cfg.data.shots)).embedding.shape)
        self.model_runs = 0
        self.cache_hits = 0

    def embed(self, pairs: list[Pair]) -> EmbeddedUser | str:
        """The user's embedding, or an error message when the embedder rejects the pairs."""
        key = self._cache_key(pairs)
        with self._lock:
            hit = self._cache.get(key) if self._cache is not None else None  # get() marks it recently used
            if hit is not None:
                self.cache_hits += 1
                embedding, profile = hit
                return EmbeddedUser(embedding, profile, self.identity.model_id, cached=True)
            try:
                user = self._run(pairs)
            except EmbeddingFailed as err:
                return str(err)
            self.model_runs += 1
            if self._cache is not None:
                self._cache[key] = (user.embedding, user.profile)  # the least recently used entry goes
            return user

    def info(self) -> dict:
        """Model id and the [L, d] shape of the embeddings this replica produces."""
        return {"model_id": self.identity.model_id, "embedding_shape": self.embedding_shape}

    def stats(self) -> dict:
        """Counters: model runs (cache misses) and cache hits since start."""
        return {"model_runs": self.model_runs, "cache_hits": self.cache_hits, "cached_users": len(self._cache or {})}

    def _run(self, pairs: list[Pair]) -> EmbeddedUser:
        group = FewShotGroup(
            group_id=0,
            user_id=0,
            pair_ids=tuple(range(len(pairs))),
            captions=tuple(caption for caption, _, _, _ in pairs),
            jpg_0=tuple(image_0 for _, image_0, _, _ in pairs),
            jpg_1=tuple(image_1 for _, _, image_1, _ in pairs),
            preferred=tuple(int(choice) for _, _, _, choice in pairs),
        )
        (row,) = self.embedder.embed_groups([group])
        if row.embedding is None:
            raise EmbeddingFailed(row.error or "the embedder returned no embedding")
        return EmbeddedUser(row.embedding, row.profile, self.identity.model_id, cached=False)

    def _cache_key(self, pairs: list[Pair]) -> str:
        digest = hashlib.sha256()
        for part in (self.identity.model_id, self.identity.prompt_hash, self.identity.key):
            digest.update(part.encode() + b"\x1e")
        for caption, image_0, image_1, choice in pairs:
            digest.update(hashlib.sha256(caption.encode()).digest())
            digest.update(hashlib.sha256(image_0).digest())
            digest.update(hashlib.sha256(image_1).digest())
            digest.update(bytes([choice]))
        return digest.hexdigest()


def _warmup_pairs(shots: int) -> list[Pair]:
    def png(value: int) -> bytes:
        return png_bytes(np.full((16, 16, 3), value, dtype=np.uint8))

    return [("a picture of a red circle", png(40 * i), png(255 - 40 * i), i % 2) for i in range(shots)]


EmbedderDeployment = serve.deployment(name="Embedder")(UserEmbedder)
