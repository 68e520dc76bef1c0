"""Adapter checkpoints: a directory with `adapter.safetensors` (adapter weights only) + `adapter_config.json`.

Nothing else is accepted on load: no pickles (.bin/.pt/.ckpt), no weights without their JSON, no JSON of another
format or version, no weights whose names or shapes differ from what the JSON describes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ppd.models.adapter import AdapterConfig, PersonalizedStageC

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "ppd-user-adapter"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


class AdapterCheckpointError(ValueError):
    """A path that is not a valid PPD adapter checkpoint."""


class AdapterCheckpointMeta(BaseModel):
    """Contents of `adapter_config.json`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["ppd-user-adapter"] = FORMAT
    format_version: int = FORMAT_VERSION
    adapter: AdapterConfig
    architecture: str = Field(description="Stage C architecture the adapter was trained on")
    base_model: str = Field(description="path or hub id of the Stage C weights (or 'tiny' for the local tiny model)")
    train_method: Literal["ppd", "dpo", "sft"] = Field(description="dpo adapters condition on the one population user")
    extra: dict[str, Any] = Field(default_factory=dict, description="free-form provenance (step, run id, ...)")

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """[L, d] of the user embeddings this adapter reads."""
        return (self.adapter.embedding_layers, self.adapter.embedding_dim)


def save_adapter(
    model: PersonalizedStageC,
    directory: str | Path,
    *,
    architecture: str,
    base_model: str,
    train_method: Literal["ppd", "dpo", "sft"],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter's weights (safetensors) and config (JSON) into `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = AdapterCheckpointMeta(
        adapter=model.adapter.config,
        architecture=architecture,
        base_model=base_model,
        train_method=train_method,
        extra=extra or {},
    )
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.adapter.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "ppd_format": FORMAT})
    (directory / CONFIG_FILE).write_text(meta.model_dump_json(indent=2))
    return directory


def read_adapter_checkpoint(path: str | Path) -> tuple[AdapterCheckpointMeta, dict[str, torch.Tensor]]:
    """Validated (config, weights) of a checkpoint directory; raises AdapterCheckpointError on anything else."""
    meta = read_adapter_meta(path)
    weights_path = Path(path) / WEIGHTS_FILE
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise AdapterCheckpointError(f"{weights_path}: not a readable safetensors file: {err}") from None
    return meta, weights


def read_adapter_meta(path: str | Path) -> AdapterCheckpointMeta:
    """The validated config of a checkpoint directory (its weights file must be there, but is not read)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise AdapterCheckpointError(f"{path}: refusing a pickle-based weight file; adapters are safetensors only")
        raise AdapterCheckpointError(f"{path}: expected a checkpoint directory with {WEIGHTS_FILE} and {CONFIG_FILE}")
    if not path.is_dir():
        raise AdapterCheckpointError(f"{path}: no such checkpoint directory")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise AdapterCheckpointError(f"{path}: missing {', '.join(missing)} (an adapter checkpoint has both)")
    try:
        meta = AdapterCheckpointMeta.model_validate(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, ValidationError) as err:
        raise AdapterCheckpointError(f"{config_path}: not a {FORMAT} v{FORMAT_VERSION} config: {err}") from None
    if meta.format_version != FORMAT_VERSION:
        raise AdapterCheckpointError(f"{config_path}: format_version {meta.format_version}, expected {FORMAT_VERSION}")
    return meta


def load_adapter(
    model: PersonalizedStageC, path: str | Path, *, architecture: str | None = None
) -> AdapterCheckpointMeta:
    """Load a checkpoint's weights into `model.adapter` after checking it describes this adapter."""
    meta, weights = read_adapter_checkpoint(path)
    if meta.adapter != model.adapter.config:
        raise AdapterCheckpointError(
            f"{path}: adapter config {meta.adapter.model_dump()} does not match the model's "
            f"{model.adapter.config.model_dump()}"
        )
    if architecture is not None and meta.architecture != architecture:
        raise AdapterCheckpointError(f"{path}: trained on {meta.architecture!r}, model is {architecture!r}")
    expected = {name: tuple(t.shape) for name, t in model.adapter.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise AdapterCheckpointError(
            f"{path}: weights do not match the adapter (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {reshaped[:5]})"
        )
    model.adapter.load_state_dict(weights, strict=True)
    return meta


def frozen_base_digest(model: PersonalizedStageC) -> str:
    """sha256 over the frozen base's state dict (names and bytes, in name order): training must never change it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.base.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
