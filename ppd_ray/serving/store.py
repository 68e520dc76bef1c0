"""The user store: random handle -> (embedding, profile), in memory, behind one small class.

It runs as a single-replica deployment so every ingress and generator replica sees the same users; its memory is
that replica's, so a restart forgets every handle (clients register again: the embedder's cache makes that cheap).
Embeddings leave the store only towards the generator path inside the cluster, never in an HTTP response.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import numpy as np
from cachetools import FIFOCache
from ray import serve

from ppd_ray.serving.schemas import HANDLE_PREFIX, HANDLE_RANDOM_BYTES


@dataclass(frozen=True)
class UserRecord:
    """One registered user: the embedding [L, d] and what may be shown about it."""

    embedding: np.ndarray  # [L, d] float32
    profile: str
    model_id: str
    created_at: float

    def public(self, handle: str) -> dict:
        """What GET /v1/users/{handle} may show: everything but the embedding."""
        return {
            "handle": handle,
            "profile": self.profile,
            "embedding_shape": list(self.embedding.shape),
            "model_id": self.model_id,
            "created_at": self.created_at,
        }


class UserStore:
    """Handles are `secrets.token_urlsafe` (192 bits), never derived from user data; oldest dropped beyond max_users."""

    def __init__(self, max_users: int) -> None:
        self.max_users = max_users
        self._users: FIFOCache = FIFOCache(maxsize=max_users)  # beyond max_users the oldest user goes

    def add(self, embedding: np.ndarray, profile: str, model_id: str) -> str:
        """Store a user; returns its new handle."""
        handle = HANDLE_PREFIX + secrets.token_urlsafe(HANDLE_RANDOM_BYTES)
        self._users[handle] = UserRecord(np.asarray(embedding, np.float32), profile, model_id, time.time())
        return handle

    def profile(self, handle: str) -> dict | None:
        """The public view of a user, or None when the handle is unknown."""
        record = self._users.get(handle)
        return None if record is None else record.public(handle)

    def embeddings(self, handles: list[str]) -> list[np.ndarray | None]:
        """The embeddings [L, d] of `handles` in order, None for an unknown handle."""
        return [None if (record := self._users.get(h)) is None else record.embedding for h in handles]

    def delete(self, handle: str) -> bool:
        """Forget a user; False when the handle was unknown."""
        return self._users.pop(handle, None) is not None


# One replica by construction (see the module docstring); it does no heavy work, so it reserves no CPU.
UserStoreDeployment = serve.deployment(name="UserStore", num_replicas=1, ray_actor_options={"num_cpus": 0})(UserStore)
