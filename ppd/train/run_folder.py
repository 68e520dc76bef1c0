"""A training run's folder: the record (MLflow run id, config digest) that lets a re-run continue the same run.

A re-run in the same folder resumes its checkpoints, so it must train the same config; only where it logs, how
often it may fail, how long it trains (a larger max_steps / epochs continues from the last checkpoint) and where the
tiny models are cached may change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ppd.config import PPDConfig

RUN_RECORD = "run.json"
# model.cache_dir is where the tiny models are cached, made absolute against the job's working directory: a Ray job's
# copy of the repository moves whenever its files change, and a demo resumed after an edit must still continue.
CONTINUABLE_FIELDS = ("tracking.", "train.max_failures", "train.max_steps", "train.epochs", "model.cache_dir")


class OtherRunInFolder(ValueError):
    """The folder holds a run of a different config."""


def config_digest(cfg: PPDConfig) -> str:
    """A short hash of every setting a continued run must keep."""
    stable = {k: v for k, v in cfg.flatten().items() if not k.startswith(CONTINUABLE_FIELDS)}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def read_run_record(out: Path, cfg: PPDConfig) -> dict[str, Any]:
    """The record of an earlier run of `cfg` in `out` ({} if none); OtherRunInFolder if it trained another config."""
    path = out / RUN_RECORD
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if record.get("config_digest") != config_digest(cfg):
        raise OtherRunInFolder(
            f"{out} holds a run of a different config (its checkpoints would be resumed): use another --out "
            "or delete that folder"
        )
    return record


def write_run_record(out: Path, cfg: PPDConfig, run_id: str) -> None:
    """Record that `out` holds MLflow run `run_id` of `cfg`."""
    (out / RUN_RECORD).write_text(json.dumps({"run_id": run_id, "config_digest": config_digest(cfg)}, indent=2))
