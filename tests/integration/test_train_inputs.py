"""The precompute job on the smoke toy world, and the inputs every Stage-2 test shares.

`stage2_inputs` and `baseline_run` are plain functions (not fixtures) that cache their outputs under the session's
base temp directory, so that the train, MLflow and multi-node test modules build them once per session.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from ppd.config import PPDConfig
from ppd.models.factory import latent_shape
from ppd.train.data import PrecomputedInputs, PrecomputedManifest

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


def stage2_inputs(tmp_path_factory, toy_world: Path, cfg: PPDConfig) -> Stage2Inputs:
    """Prepared smoke toy world + test embeddings + the precompute job's output (built once per session)."""
    from ppd_ray.jobs.precompute import run as precompute
    from ppd_ray.jobs.prepare import run as prepare

    root = tmp_path_factory.getbasetemp() / "stage2"
    inputs = Stage2Inputs(root / "prepared", root / "embeddings", root / "precomputed")
    if not (inputs.precomputed / "manifest.json").exists():
        prepare(cfg, toy_world / "pairs" / "population", inputs.prepared)
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


# --- the precompute job ---------------------------------------------------------------------------------------------


def _decode(png: bytes) -> torch.Tensor:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1  # [3, H, W]


def test_precomputed_rows_hold_the_pairs_latents_caption_and_condition_embedding(inputs, smoke_config):
    manifest = PrecomputedManifest.read(inputs.precomputed)
    opened = PrecomputedInputs(inputs.precomputed)
    prepared = pq.read_table(inputs.prepared / "train").to_pandas().set_index("pair_id")
    groups = pq.read_table(inputs.prepared / "groups").to_pandas().set_index("group_id")
    rows = pq.read_table(manifest.split_paths(inputs.precomputed, "train"))

    # every trainable prepared pair is there exactly once; the rest is counted
    trainable = prepared[prepared["condition_group_id"].notna()]
    assert sorted(rows.column("pair_id").to_pylist()) == sorted(trainable.index)
    assert manifest.splits["train"].rows == rows.num_rows
    assert manifest.rejected["train"]["no_condition_group"] == len(prepared) - len(trainable)
    assert manifest.embedding_shape == EMBEDDING_SHAPE and manifest.latent_shape == latent_shape(smoke_config.model)

    # files in manifest order hold a seeded shuffle: order keys increase, pair ids do not
    order = rows.column("order_key").to_numpy()
    assert (np.diff(order) > 0).all()
    assert not (np.diff(rows.column("pair_id").to_numpy()) > 0).all()

    from ppd.models.factory import load_caption_encoder

    encoder = load_caption_encoder(smoke_config.model)
    sample = rows.take([0, 7, rows.num_rows - 1])
    batch = opened.batch(sample)
    for i, pair_id in enumerate(sample.column("pair_id").to_pylist()):
        source = prepared.loc[pair_id]
        # latents: the toy codec (2x2 pixel blocks -> channels) of the decoded PNGs, the preferred image first
        images = [_decode(source.jpg_0), _decode(source.jpg_1)]
        winner, loser = images[source.preferred], images[1 - source.preferred]
        assert torch.allclose(batch["latents_win"][i], F.pixel_unshuffle(winner[None], 2)[0])
        assert torch.allclose(batch["latents_lose"][i], F.pixel_unshuffle(loser[None], 2)[0])
        # caption states: what the caption encoder gives for this pair's caption
        hidden, pooled = encoder.encode_captions([source.caption])
        assert torch.allclose(batch["clip_text_hidden"][i], hidden[0], atol=1e-5)
        assert torch.allclose(batch["clip_text_pooled"][i], pooled[0], atol=1e-5)
        # user embedding: the one of its condition group, a group of the same user without this pair
        group = int(source.condition_group_id)
        assert torch.equal(batch["user_embedding"][i], torch.from_numpy(group_embedding(group)))
        assert groups.loc[group, "user_id"] == source.user_id
        assert pair_id not in list(groups.loc[group, "pair_ids"])


def test_cli_reports_bad_inputs_in_one_line(inputs, tmp_path):
    from ppd_ray.cli.main import app

    runner = CliRunner()
    missing = runner.invoke(
        app,
        [
            "precompute",
            "--prepared",
            str(inputs.prepared),
            "--embeddings",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path),
        ],
    )
    assert missing.exit_code == 2 and "embeddings" in missing.output and "do not exist" in missing.output
    assert "Traceback" not in missing.output

    other_users = tmp_path / "other"
    other_users.mkdir()
    from ppd.embed.base import EmbeddingRow
    from ppd.embed.store import rows_to_table

    group = pq.read_table(inputs.prepared / "groups").to_pylist()[0]
    wrong_owner = EmbeddingRow(
        user_id=group["user_id"] + 10_000, group_id=group["group_id"], pair_ids=[], embedding=group_embedding(0)
    )
    pq.write_table(rows_to_table([wrong_owner]), other_users / "part-x.parquet")
    result = runner.invoke(
        app,
        [
            "precompute",
            "--prepared",
            str(inputs.prepared),
            "--embeddings",
            str(other_users),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "another preparation" in result.output
