"""Precompute logic and precomputed inputs: latents, the embedding join, tensor tables, batches, the schedule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ppd.config import ModelConfig, TrainConfig
from ppd.errors import InputDataError
from ppd.train.data import (
    CAPTIONS_FILE,
    EMBEDDINGS_FILE,
    PrecomputedError,
    PrecomputedInputs,
    PrecomputedManifest,
    SplitFiles,
    TensorTable,
    TrainingSchedule,
    micro_batch_generator,
)
from ppd.train.precompute import (
    ToyLatentEncoder,
    caption_index,
    decode_image,
    embedding_rows,
    encode_pairs,
    join_training_rows,
    load_latent_encoder,
    read_pair_metadata,
)
from tests.helpers import png_of


def _random_pixels(seed: int, side: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(side, side, 3))


# --- prepared pairs ------------------------------------------------------------------------------------------------


def test_pair_metadata_reads_each_split_and_names_a_folder_that_is_not_prepared(tmp_path) -> None:
    with pytest.raises(InputDataError, match="train has no parquet files"):
        read_pair_metadata(tmp_path, ("train",))
    (tmp_path / "train").mkdir()
    rows = {
        "pair_id": [1, 2],
        "user_id": [7, 7],
        "caption": ["a red ring", "a blue cross"],
        "condition_group_id": [3, 3],
    }
    pq.write_table(pa.table({**rows, "jpg_0": [b"", b""]}), tmp_path / "train" / "part-0.parquet")
    pairs = read_pair_metadata(tmp_path, ("train", "validation"))  # no validation files: skipped, not an error
    assert pairs.to_dict("list") == {**rows, "split": ["train", "train"]}
    (tmp_path / "test").mkdir()
    pq.write_table(pa.table({"pair_id": [3]}), tmp_path / "test" / "part-0.parquet")  # no caption column
    with pytest.raises(InputDataError, match="test: not a prepared split"):
        read_pair_metadata(tmp_path, ("train", "test"))


# --- images -> latents ---------------------------------------------------------------------------------------------


def test_decode_image_scales_to_minus_one_one_and_rejects_what_it_cannot_use() -> None:
    pixels = _random_pixels(0)
    decoded = decode_image(png_of(pixels), image_size=4, resize=False)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    assert decoded is not None and torch.allclose(decoded, expected)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert decode_image(b"not an image", 4, resize=False) is None
    assert decode_image(None, 4, resize=False) is None
    assert decode_image(png_of(_random_pixels(0, side=8)), 4, resize=False) is None  # wrong size, no resampling
    assert decode_image(png_of(_random_pixels(0, side=8)), 4, resize=True).shape == (3, 4, 4)


def test_encode_pairs_puts_the_preferred_image_first_and_drops_broken_pairs() -> None:
    images = [_random_pixels(seed) for seed in range(6)]
    jpg_0 = [png_of(images[0]), png_of(images[2]), b"broken"]
    jpg_1 = [png_of(images[1]), png_of(images[3]), png_of(images[5])]
    latents = encode_pairs(jpg_0, jpg_1, preferred=[0, 1, 0], encoder=ToyLatentEncoder(image_size=4))

    assert latents.kept.tolist() == [True, True, False]

    def unshuffled(pixels: np.ndarray) -> torch.Tensor:  # the toy codec by hand: 2x2 pixel blocks -> 12 channels
        rgb = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # [3, 4, 4]
        return rgb.reshape(3, 2, 2, 2, 2).permute(0, 2, 4, 1, 3).reshape(12, 2, 2)

    assert latents.latents_win.shape == (2, 12, 2, 2)
    assert torch.allclose(latents.latents_win[0], unshuffled(images[0]))  # preferred 0 -> jpg_0 wins
    assert torch.allclose(latents.latents_lose[0], unshuffled(images[1]))
    assert torch.allclose(latents.latents_win[1], unshuffled(images[3]))  # preferred 1 -> jpg_1 wins
    assert torch.allclose(latents.latents_lose[1], unshuffled(images[2]))


def test_latent_encoder_of_the_tiny_model_matches_its_latents_and_real_ones_say_what_is_missing() -> None:
    tiny = load_latent_encoder(ModelConfig(architecture="tiny", latent_size=8))
    assert tiny.image_size == 16
    assert tiny.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 12, 8, 8)
    # The real encoder's weights come from the hub (or model.effnet_path): offline, a one-line error saying what to set.
    with pytest.raises(FileNotFoundError, match="model.effnet_path"):
        load_latent_encoder(ModelConfig(architecture="stage_c_lite"), device="cpu")


# --- the join ------------------------------------------------------------------------------------------------------


def _pairs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pair_id": [5, 1, 2, 3, 4, 6],
            "split": ["train", "train", "train", "validation", "train", "validation"],
            "user_id": [10, 10, 10, 11, 11, 11],
            "caption": ["b", "a", "a", "c", "b", "a"],
            # pair 2 has no condition group; pair 4's group 21 has no embedding
            "condition_group_id": pd.array([20, 20, None, 22, 21, 22], dtype="Int64"),
        }
    )


def _embeddings() -> dict[tuple[int, int], np.ndarray]:
    return {
        (10, 20): np.full((2, 3), 20.0, np.float32),
        (11, 22): np.full((2, 3), 22.0, np.float32),
        (11, 23): np.full((2, 3), 23.0, np.float32),  # a group no pair is conditioned on
    }


def test_join_puts_each_pair_with_its_condition_group_and_counts_what_it_leaves_out() -> None:
    captions = caption_index(_pairs()["caption"])
    assert captions == {"a": 0, "b": 1, "c": 2}
    joined, index, skipped = join_training_rows(_pairs(), _embeddings(), captions, order_seed=0)

    assert sorted(joined["pair_id"]) == [1, 3, 5, 6]
    assert skipped == {
        "train": {"no_condition_group": 1, "no_embedding": 1, "undecodable_image": 0},
        "validation": {"no_condition_group": 0, "no_embedding": 0, "undecodable_image": 0},
    }
    assert index.embedding_shape == (2, 3)
    assert list(index.table["group_id"]) == [20, 22]  # only the groups that condition a kept pair
    rows = embedding_rows(index, _embeddings(), 0, len(index.table))  # [G, 2, 3]
    source = _pairs().set_index("pair_id")
    for pair in joined.itertuples():
        assert pair.caption_index == captions[source.loc[pair.pair_id, "caption"]]
        assert pair.condition_group_id == source.loc[pair.pair_id, "condition_group_id"]
        # the embedding row a pair reads is the one of its own condition group
        assert torch.all(rows[pair.embedding_index] == float(pair.condition_group_id))
        assert index.table.loc[pair.embedding_index, "user_id"] == pair.user_id


def test_joined_row_order_is_a_seeded_permutation() -> None:
    captions = caption_index(_pairs()["caption"])
    first, _, _ = join_training_rows(_pairs(), _embeddings(), captions, order_seed=3)
    again, _, _ = join_training_rows(_pairs().sample(frac=1, random_state=1), _embeddings(), captions, order_seed=3)
    assert sorted(first["order_key"]) == list(range(len(first)))
    assert first.set_index("pair_id")["order_key"].equals(again.set_index("pair_id")["order_key"])
    orders = {
        tuple(join_training_rows(_pairs(), _embeddings(), captions, order_seed=s)[0]["order_key"]) for s in range(8)
    }
    assert len(orders) > 1


def test_join_refuses_embeddings_of_another_users_group() -> None:
    wrong = {**_embeddings(), (99, 21): np.zeros((2, 3), np.float32)}  # group 21 belongs to user 11 in the pairs
    with pytest.raises(ValueError, match="another preparation"):
        join_training_rows(_pairs(), wrong, caption_index(_pairs()["caption"]), order_seed=0)
    mixed = {**_embeddings(), (11, 21): np.zeros((4, 3), np.float32)}
    with pytest.raises(ValueError, match="different shapes"):
        join_training_rows(_pairs(), mixed, caption_index(_pairs()["caption"]), order_seed=0)


# --- tensor tables and batches -------------------------------------------------------------------------------------


def test_tensor_table_writes_a_standard_safetensors_file_row_by_row(tmp_path) -> None:
    hidden = torch.randn(5, 3, 4)
    pooled = torch.randn(5, 1, 4)
    path = tmp_path / "table.safetensors"
    specs = {"hidden": ((5, 3, 4), torch.float32), "pooled": ((5, 1, 4), torch.bfloat16)}
    with TensorTable.create(path, specs, metadata={"what": "test"}) as writer:
        for rows in ([3, 0], [4, 1, 2]):  # out of order, in pieces
            writer.write("hidden", rows, hidden[rows])
            writer.write("pooled", rows, pooled[rows])
        with pytest.raises(ValueError):
            writer.write("hidden", [0], torch.zeros(1, 3, 5))

    loaded = load_file(str(path))  # the reference reader agrees with what was written
    assert torch.equal(loaded["hidden"], hidden)
    assert loaded["pooled"].dtype == torch.bfloat16 and torch.equal(loaded["pooled"], pooled.bfloat16())

    table = TensorTable(path)
    assert table.metadata == {"what": "test"} and table.shape("hidden") == (5, 3, 4)
    assert torch.equal(table.rows("hidden", [4, 0, 4]), hidden[[4, 0, 4]])
    assert torch.equal(table.rows("pooled", [2]), pooled[[2]].bfloat16())
    with pytest.raises(PrecomputedError, match="out of range"):
        table.rows("hidden", [5])


def _precomputed_dir(tmp_path, pairs: int = 6):
    generator = torch.Generator().manual_seed(0)
    hidden, pooled = torch.randn(3, 7, 4, generator=generator), torch.randn(3, 1, 4, generator=generator)
    users = torch.randn(2, 2, 5, generator=generator)
    with TensorTable.create(
        tmp_path / CAPTIONS_FILE,
        {"clip_text_hidden": ((3, 7, 4), torch.float32), "clip_text_pooled": ((3, 1, 4), torch.float32)},
    ) as writer:
        writer.write("clip_text_hidden", [0, 1, 2], hidden)
        writer.write("clip_text_pooled", [0, 1, 2], pooled)
    with TensorTable.create(tmp_path / EMBEDDINGS_FILE, {"user_embedding": ((2, 2, 5), torch.float32)}) as writer:
        writer.write("user_embedding", [0, 1], users)
    PrecomputedManifest(
        architecture="tiny",
        text_encoder="tiny",
        latent_shape=(12, 2, 2),
        text_shape=(7, 4),
        pooled_dim=4,
        embedding_shape=(2, 5),
        splits={"train": SplitFiles(rows=pairs, files=[])},
        captions=3,
        user_embeddings=2,
        rejected={"train": {}},
        order_seed=0,
    ).write(tmp_path)
    latents_win = torch.randn(pairs, 12, 2, 2, generator=generator)
    latents_lose = torch.randn(pairs, 12, 2, 2, generator=generator)
    rows = pa.table(
        {
            "pair_id": pa.array(range(pairs), pa.int64()),
            "caption_index": pa.array([i % 3 for i in range(pairs)], pa.int64()),
            "embedding_index": pa.array([i % 2 for i in range(pairs)], pa.int64()),
            "latents_win": pa.FixedSizeListArray.from_arrays(pa.array(latents_win.flatten().numpy()), 48),
            "latents_lose": pa.FixedSizeListArray.from_arrays(pa.array(latents_lose.flatten().numpy()), 48),
        }
    )
    return rows, {"hidden": hidden, "pooled": pooled, "users": users, "win": latents_win, "lose": latents_lose}


def test_batch_looks_up_caption_and_user_rows_for_each_pair(tmp_path) -> None:
    rows, source = _precomputed_dir(tmp_path)
    inputs = PrecomputedInputs(tmp_path)
    batch = inputs.batch(rows.slice(1, 4))  # pairs 1, 2, 3
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "latents_win": (4, 12, 2, 2),
        "latents_lose": (4, 12, 2, 2),
        "clip_text_hidden": (4, 7, 4),
        "clip_text_pooled": (4, 1, 4),
        "user_embedding": (4, 2, 5),
    }
    assert torch.equal(batch["latents_win"], source["win"][1:5])
    assert torch.equal(batch["latents_lose"], source["lose"][1:5])
    assert torch.equal(batch["clip_text_hidden"], source["hidden"][[1, 2, 0, 1]])
    assert torch.equal(batch["clip_text_pooled"], source["pooled"][[1, 2, 0, 1]])
    assert torch.equal(batch["user_embedding"], source["users"][[1, 0, 1, 0]])
    # the same rows as Ray Data's numpy batches (an object array of 1-D arrays) give the same batch
    as_numpy = {name: rows.slice(1, 4).column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    assert all(torch.equal(inputs.batch(as_numpy)[k], v) for k, v in batch.items())


def test_opening_a_directory_that_is_not_precomputed_names_the_problem(tmp_path) -> None:
    with pytest.raises(PrecomputedError, match="manifest.json"):
        PrecomputedInputs(tmp_path)
    _precomputed_dir(tmp_path)
    (tmp_path / CAPTIONS_FILE).write_bytes(b"\x00" * 3)
    with pytest.raises(PrecomputedError, match="not a readable safetensors"):
        PrecomputedInputs(tmp_path)


# --- schedule and randomness ---------------------------------------------------------------------------------------


def test_schedule_counts_micro_batches_per_worker_and_steps() -> None:
    train = TrainConfig(num_workers=2, micro_batch=4, effective_batch=16, epochs=2.0)  # accumulation 2
    schedule = TrainingSchedule.from_config(train, rows=101)  # 50 rows per worker -> 12 micro-batches
    assert (schedule.micro_batches_per_epoch, schedule.accumulation) == (12, 2)
    assert schedule.total_steps == 12 and schedule.total_micro_steps == 24  # 2 epochs x 12 / 2
    assert schedule.position(0) == (0, 0) and schedule.position(13) == (1, 1)
    capped = TrainingSchedule.from_config(train.model_copy(update={"max_steps": 7}), rows=101)
    assert capped.total_steps == 7
    with pytest.raises(ValueError, match="fewer than micro_batch"):
        TrainingSchedule.from_config(train, rows=7)
    with pytest.raises(ValueError, match="do not fill one optimiser step"):
        TrainingSchedule.from_config(train.model_copy(update={"epochs": 0.05}), rows=101)


def test_micro_batch_randomness_depends_only_on_seed_step_and_rank() -> None:
    def draws(seed: int, step: int, rank: int) -> torch.Tensor:
        return torch.rand(8, generator=micro_batch_generator(seed, step, rank))

    assert torch.equal(draws(0, 5, 1), draws(0, 5, 1))
    distinct = [draws(0, 5, 1), draws(0, 5, 0), draws(0, 6, 1), draws(1, 5, 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :])


def test_the_job_reports_a_folder_that_is_not_prepared_in_one_line_and_exit_status_2(tmp_path, capsys) -> None:
    from ppd_ray.jobs import precompute

    (tmp_path / "prepared").mkdir()  # exists, but holds no train split: the library's InputDataError
    argv = ["--prepared", str(tmp_path / "prepared"), "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "o")]
    assert precompute.main([*argv, "--preset", "smoke"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and "train has no parquet files" in error[-1]
