"""What every user embedder shares: the row it produces, layer selection, and per-group error handling."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ppd.embed.groups import FewShotGroup, UndecodableGroup

LayerSpec = str | list[int]


@dataclass
class EmbeddingRow:
    """One user embedding: the contract row of DESIGN.md section 3 (one per (user_id, group_id)).

    `embedding` is float32 [L, d]: L selected hidden-state layers of the VLM at the final generated token, or L = N
    pair tokens for the pair-difference embedder. It is None, and `error` says why, when the group could not be
    embedded (e.g. an undecodable image).
    """

    user_id: int
    group_id: int
    pair_ids: list[int]
    embedding: np.ndarray | None  # [L, d] float32
    profile: str = ""
    generated_text: str = ""
    layers: list[int] = field(default_factory=list)
    model_id: str = ""
    prompt_hash: str = ""
    settings: str = "{}"  # JSON of the settings that change the embedding (resume key with model_id + prompt_hash)
    error: str | None = None


@dataclass(frozen=True)
class EmbeddingIdentity:
    """What makes two embeddings comparable: same embedder, model, prompt, layers and settings.

    Known from the config alone (no weights loaded), so the job can tell which groups an output folder already holds
    before it starts any model.
    """

    embedder: str
    model_id: str
    prompt_hash: str
    layers: tuple[int, ...]
    settings: dict[str, Any]

    @property
    def settings_json(self) -> str:
        return json.dumps({"embedder": self.embedder, **self.settings}, sort_keys=True)

    @property
    def key(self) -> str:
        """A short hash of the whole identity (names the output part files)."""
        text = "\x1e".join([self.model_id, self.prompt_hash, json.dumps(self.layers), self.settings_json])
        return hashlib.sha256(text.encode()).hexdigest()[:10]


class Embedder:
    """Few-shot groups -> EmbeddingRows; the model is loaded once, in the constructor."""

    identity: EmbeddingIdentity

    def embed_groups(self, groups: Sequence[FewShotGroup]) -> list[EmbeddingRow]:
        """Embed a batch of groups; a group that cannot be decoded gets an error row, the others are embedded."""
        decoded, rows = [], [None] * len(groups)
        for index, group in enumerate(groups):
            try:
                decoded.append((index, self._decode(group)))
            except UndecodableGroup as err:
                rows[index] = self._row(group, None, error=str(err))
        if decoded:
            embedded = self._embed_decoded([groups[i] for i, _ in decoded], [d for _, d in decoded])
            for (index, _), row in zip(decoded, embedded, strict=True):
                rows[index] = row
        return rows

    def _decode(self, group: FewShotGroup) -> Any:
        return group.images()

    def _embed_decoded(self, groups: list[FewShotGroup], decoded: list[Any]) -> list[EmbeddingRow]:
        raise NotImplementedError

    def _row(self, group: FewShotGroup, embedding: np.ndarray | None, **fields: Any) -> EmbeddingRow:
        return EmbeddingRow(
            user_id=group.user_id,
            group_id=group.group_id,
            pair_ids=list(group.pair_ids),
            embedding=None if embedding is None else np.ascontiguousarray(embedding, dtype=np.float32),
            layers=list(self.identity.layers),
            model_id=self.identity.model_id,
            prompt_hash=self.identity.prompt_hash,
            settings=self.identity.settings_json,
            **fields,
        )


def resolve_layers(spec: LayerSpec, num_hidden_states: int) -> list[int]:
    """`last` | `all` | indices -> indices into the hidden-state tuple (0 = token embeddings, n-1 = last layer).

    `all` is the authors' choice (embeddings + every decoder layer: 29 for the 7B); negative indices count from the
    end; anything out of range is a ValueError naming the valid range.
    """
    if spec == "last":
        return [num_hidden_states - 1]
    if spec == "all":
        return list(range(num_hidden_states))
    if isinstance(spec, str) or not spec:
        raise ValueError(f"layers must be 'last', 'all' or a non-empty list of indices, not {spec!r}")
    resolved = []
    for index in spec:
        if not -num_hidden_states <= int(index) < num_hidden_states:
            raise ValueError(
                f"layer {index} out of range: the model has {num_hidden_states} hidden states "
                f"(0 = embeddings .. {num_hidden_states - 1} = last layer; negatives count from the end)"
            )
        resolved.append(int(index) % num_hidden_states)
    return resolved


@contextmanager
def quiet_progress_bars():
    """No "Writing model shards" / "Loading weights" bars while tiny models are built and loaded."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
