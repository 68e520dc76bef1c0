"""Helpers shared by the tests (one copy each; test modules import from here, never from each other).

PNG bytes of a pixel array or of one colour; the processes still running that mention a path or address (what a
command should have stopped); a toy world holding only its one-reward users; `scripts/serve_load.py` as a module; and
the Stage-2 inputs (the real prepare and precompute jobs' outputs on the smoke toy world, the baseline training run),
plain functions that cache their outputs under the session's base temp directory so that every module that needs them
builds them once per session (`tests/integration/conftest.py` wires them into fixtures).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ppd.config import PPDConfig
from ppd.data.images import png_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]

_OWN_PID = os.getpid()


def png_of(pixels: np.ndarray) -> bytes:
    """PNG bytes of pixels [H, W, 3] (any integer dtype, values 0..255)."""
    return png_bytes(np.asarray(pixels).astype(np.uint8))


def solid_png(colour: tuple[int, int, int], width: int, height: int | None = None) -> bytes:
    """PNG bytes of a `width` x `height` (default square) image of one colour."""
    return png_of(np.broadcast_to(np.asarray(colour, np.uint8), (height or width, width, 3)))


def processes_mentioning(text: str) -> list[str]:
    """`pid: command line` of every process on this machine (but this one) whose command line contains `text`.

    Read from /proc rather than `pgrep -f`, whose pattern is a regex: paths and addresses hold dots."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == _OWN_PID:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in command:
            found.append(f"{entry.name}: {command.strip()}")
    return found


def one_reward_world(tmp_path: Path) -> Path:
    """A toy-world folder holding only the manifest's one-reward users (all the demo's job planning reads of it)."""
    world = tmp_path / "toy"
    world.mkdir(exist_ok=True)
    users = {"brightness": 100, "saturation": 101, "centredness": 102, "warmth": 103, "size": 104}
    (world / "manifest.json").write_text(json.dumps({"one_reward_users": users}))
    return world


def serve_load_script():
    """`scripts/serve_load.py` as a module (scripts/ is not a package): the load/fault run's users, images and
    random adapter, which the Serve and web tests use too. Loaded once."""
    if "serve_load" not in sys.modules:
        spec = importlib.util.spec_from_file_location("serve_load", REPO_ROOT / "scripts" / "serve_load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["serve_load"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["serve_load"]


# --- Stage-2 inputs -------------------------------------------------------------------------------------------------

EMBEDDING_SHAPE = (4, 16)  # [L, d] of the test embeddings


def group_embedding(group_id: int) -> np.ndarray:
    """The deterministic stand-in for a Stage-1 embedding of a group: test input, not a model output."""
    return np.random.default_rng([7, group_id]).standard_normal(EMBEDDING_SHAPE).astype(np.float32)


def write_test_embeddings(prepared: Path, out: Path) -> Path:
    """One embedding per few-shot group of `prepared`, in the Stage-1 store format (ppd.embed.store)."""
    from ppd.embed.base import EmbeddingRow
    from ppd.embed.store import rows_to_table

    groups = pq.read_table(prepared / "groups", columns=["group_id", "user_id", "pair_ids"]).to_pylist()
    rows = [
        EmbeddingRow(
            user_id=group["user_id"],
            group_id=group["group_id"],
            pair_ids=group["pair_ids"],
            embedding=group_embedding(group["group_id"]),
            model_id="test-random",
            prompt_hash="none",
        )
        for group in groups
    ]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), out / "part-test.parquet")
    return out


@dataclass(frozen=True)
class Stage2Inputs:
    prepared: Path
    embeddings: Path
    precomputed: Path


def prepared_population(tmp_path_factory, toy_world: Path, cfg: PPDConfig) -> Path:
    """The prepare job's output for the smoke toy world's population (run once per session; needs a local Ray)."""
    from ppd_ray.jobs.prepare import run as prepare

    out = tmp_path_factory.getbasetemp() / "stage2" / "prepared"
    if not (out / "accounting.json").exists():
        prepare(cfg, toy_world / "pairs" / "population", out)
    return out


def stage2_inputs(tmp_path_factory, toy_world: Path, cfg: PPDConfig) -> Stage2Inputs:
    """Prepared smoke toy world + test embeddings + the precompute job's output (built once per session)."""
    from ppd_ray.jobs.precompute import run as precompute

    root = tmp_path_factory.getbasetemp() / "stage2"
    inputs = Stage2Inputs(
        prepared_population(tmp_path_factory, toy_world, cfg), root / "embeddings", root / "precomputed"
    )
    if not (inputs.precomputed / "manifest.json").exists():
        write_test_embeddings(inputs.prepared, inputs.embeddings)
        precompute(cfg, inputs.prepared, inputs.embeddings, inputs.precomputed)
    return inputs


# The run every training test compares against: 2 workers x micro-batch 8 x accumulation 2 = 32 pairs per step,
# 18 steps (past the end of the first epoch of 14 steps), checkpoints at 6, 12, 18.
BASELINE_OVERRIDES = [
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.micro_batch=8",
    "train.effective_batch=32",
    "train.max_steps=18",
    "train.checkpoint_every=6",
    "train.max_failures=0",
    "eval.inference_steps=3",
    "tracking.sample_captions=2",
    "tracking.sample_users=2",
]


def baseline_config(cfg: PPDConfig, tracking_uri: str, *extra: str) -> PPDConfig:
    """The baseline run's config (plus `extra` overrides), logging to `tracking_uri`."""
    return cfg.with_overrides([*BASELINE_OVERRIDES, f"tracking.uri={tracking_uri}", *extra])


def baseline_run(tmp_path_factory, cfg: PPDConfig, inputs: Stage2Inputs, tracking_uri: str) -> dict:
    """The uninterrupted 2-worker ZeRO-2 run (summary.json of its run folder), trained once per session."""
    from ppd_ray.jobs.train import run as train

    out = tmp_path_factory.getbasetemp() / "stage2" / "baseline"
    if not (out / "summary.json").exists():
        train(baseline_config(cfg, tracking_uri), inputs.precomputed, out)
    return {**json.loads((out / "summary.json").read_text()), "out": out}


def mlflow_store(tmp_path_factory) -> Path:
    """One MLflow store (sqlite + artifacts) per session, served by the session's `tracking` server."""
    return tmp_path_factory.getbasetemp() / "stage2" / "mlflow"
