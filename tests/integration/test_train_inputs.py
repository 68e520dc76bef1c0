"""The precompute job on the smoke toy world: the rows every Stage-2 test trains on (built by
`tests.helpers.stage2_inputs`)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from ppd.models.factory import latent_shape
from ppd.train.data import PrecomputedInputs, PrecomputedManifest
from tests.helpers import EMBEDDING_SHAPE, group_embedding


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
