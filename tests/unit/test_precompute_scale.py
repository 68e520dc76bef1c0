"""Precompute at Pick-a-Pic size: embeddings planned from a catalog and streamed, bf16 latents at half the bytes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ppd.embed.base import EmbeddingIdentity, EmbeddingRow
from ppd.embed.store import (
    iter_embeddings,
    load_embedding_catalog,
    read_embedding_catalog,
    read_embeddings,
    write_part,
)
from ppd.errors import InputDataError
from ppd.train.data import (
    CAPTIONS_FILE,
    EMBEDDINGS_FILE,
    PrecomputedInputs,
    PrecomputedManifest,
    SplitFiles,
    TensorTable,
    latent_column,
)

IDENTITY = EmbeddingIdentity("vlm-vllm", "llava", "abc", (0, 1, 2), {"temperature": 0.7})


def _row(user_id: int, group_id: int, rng, error: str | None = None) -> EmbeddingRow:
    return EmbeddingRow(
        user_id=user_id,
        group_id=group_id,
        pair_ids=[group_id * 4 + i for i in range(4)],
        embedding=None if error else rng.standard_normal((3, 6)).astype(np.float32),
        layers=list(IDENTITY.layers),
        model_id=IDENTITY.model_id,
        prompt_hash=IDENTITY.prompt_hash,
        settings=IDENTITY.settings_json,
        error=error,
    )


def test_catalog_and_stream_give_what_the_full_read_gives(tmp_path) -> None:
    rng = np.random.default_rng(0)
    write_part([_row(1, 10, rng), _row(1, 11, rng), _row(2, 12, rng, error="undecodable image")], tmp_path, IDENTITY)
    write_part([_row(2, 13, rng), _row(3, 14, rng)], tmp_path, IDENTITY)
    everything = read_embeddings(tmp_path)

    catalog = read_embedding_catalog(tmp_path)
    assert catalog == {key: (3, 6) for key in everything}  # error rows are not in the catalog either
    assert (2, 12) not in catalog

    wanted = {(1, 11), (2, 13), (9, 99)}  # (9, 99) is not stored: simply not yielded
    streamed = {}
    for keys, vectors in iter_embeddings(tmp_path, wanted):
        assert vectors.dtype == np.float32 and vectors.shape == (len(keys), 3, 6)
        streamed.update(zip(keys, vectors, strict=True))
    assert set(streamed) == {(1, 11), (2, 13)}
    for key, vector in streamed.items():
        np.testing.assert_array_equal(vector, everything[key])


def test_catalog_refuses_mixed_kinds_and_duplicates(tmp_path) -> None:
    rng = np.random.default_rng(1)
    other = EmbeddingIdentity("vlm-vllm", "llava", "def", (0, 1, 2), {"temperature": 0.7})
    write_part([_row(1, 10, rng)], tmp_path, IDENTITY)
    stranger = _row(1, 11, rng)
    stranger.prompt_hash = other.prompt_hash
    write_part([stranger], tmp_path, other)
    with pytest.raises(ValueError, match="mixes 2 kinds"):
        read_embedding_catalog(tmp_path)
    assert set(read_embedding_catalog(tmp_path, prompt_hash="def")) == {(1, 11)}
    write_part([_row(1, 10, rng), _row(5, 50, rng)], tmp_path, IDENTITY)  # group 10 a second time
    with pytest.raises(ValueError, match="stored twice"):
        read_embedding_catalog(tmp_path, prompt_hash="abc")


def _precomputed(tmp_path, latents_win: torch.Tensor, latents_lose: torch.Tensor, dtype: str) -> pa.Table:
    pairs, shape = latents_win.shape[0], tuple(latents_win.shape[1:])
    with TensorTable.create(
        tmp_path / CAPTIONS_FILE,
        {"clip_text_hidden": ((1, 3, 4), torch.float32), "clip_text_pooled": ((1, 1, 4), torch.float32)},
    ) as writer:
        writer.write("clip_text_hidden", [0], torch.ones(1, 3, 4))
        writer.write("clip_text_pooled", [0], torch.ones(1, 1, 4))
    with TensorTable.create(tmp_path / EMBEDDINGS_FILE, {"user_embedding": ((1, 2, 5), torch.float32)}) as writer:
        writer.write("user_embedding", [0], torch.ones(1, 2, 5))
    PrecomputedManifest(
        architecture="stage_c_lite",
        text_encoder="test",
        latent_shape=shape,
        latent_dtype=dtype,
        text_shape=(3, 4),
        pooled_dim=4,
        embedding_shape=(2, 5),
        splits={"train": SplitFiles(rows=pairs, files=[])},
        captions=1,
        user_embeddings=1,
        rejected={"train": {}},
        order_seed=0,
    ).write(tmp_path)
    width = int(np.prod(shape))
    return pa.table(
        {
            "pair_id": pa.array(range(pairs), pa.int64()),
            "caption_index": pa.array([0] * pairs, pa.int64()),
            "embedding_index": pa.array([0] * pairs, pa.int64()),
            "latents_win": latent_column(latents_win, width, dtype),
            "latents_lose": latent_column(latents_lose, width, dtype),
        }
    )


def test_bf16_latents_are_stored_at_half_the_bytes_and_read_back_as_their_bf16_values(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    win, lose = torch.randn(4, 16, 3, 3, generator=generator), torch.randn(4, 16, 3, 3, generator=generator)
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path / dtype
        folder.mkdir()
        rows = _precomputed(folder, win, lose, dtype)
        pq.write_table(rows, folder / "rows.parquet", compression="none")
        sizes[dtype] = rows.column("latents_win").nbytes
        batch = PrecomputedInputs(folder).batch(pq.read_table(folder / "rows.parquet"))
        assert batch["latents_win"].dtype == torch.float32 and batch["latents_win"].shape == (4, 16, 3, 3)
        expected_win = win if dtype == "float32" else win.bfloat16().float()  # exactly the rounded values
        assert torch.equal(batch["latents_win"], expected_win)
        assert torch.equal(batch["latents_lose"], lose if dtype == "float32" else lose.bfloat16().float())
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    assert latent_column(torch.empty(0, 16, 3, 3), 144, "bfloat16").type == pa.list_(pa.uint16(), 144)


def test_latents_stored_in_another_dtype_than_the_manifest_says_are_refused(tmp_path) -> None:
    win = torch.randn(2, 4, 2, 2)
    rows = _precomputed(tmp_path, win, win, "bfloat16")
    wrong = rows.set_column(3, "latents_win", latent_column(win, 16, "float32"))
    with pytest.raises(ValueError, match="uint16"):
        PrecomputedInputs(tmp_path).batch(wrong)


def test_a_named_embedding_folder_that_is_missing_empty_or_all_errors_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputDataError, match="do not exist"):
        load_embedding_catalog(tmp_path / "nowhere")
    with pytest.raises(InputDataError, match="no embedding part files"):
        load_embedding_catalog(tmp_path)
    write_part([_row(1, 10, np.random.default_rng(2), error="undecodable image")], tmp_path, IDENTITY)
    with pytest.raises(InputDataError, match="no successful embedding"):
        load_embedding_catalog(tmp_path)
    write_part([_row(2, 20, np.random.default_rng(3))], tmp_path, IDENTITY)
    assert load_embedding_catalog(tmp_path) == {(2, 20): (3, 6)}
