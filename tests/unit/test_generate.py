"""The one generation path (`VariantGenerator`): what evaluation, a training run's MLflow grid and Serve all call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppd.config import load_config
from ppd.errors import InputDataError
from ppd.eval.generate import VariantGenerator, check_user_embeddings, distinct_images, user_grid, user_grid_rows
from ppd.models.factory import save_random_adapter

CAPTIONS = ["a picture of a teal ring", "a picture of a red cross"]
SEEDS = [3, 4]
EMBEDDING_SHAPE = (4, 16)  # [L, d]


@pytest.fixture(scope="module")
def cfg():
    # Two steps without text guidance: what is tested here does not depend on either, and each call is 4x cheaper.
    return load_config("tiny_cpu", ["eval.inference_steps=2", "eval.guidance=1"])


@pytest.fixture(scope="module")
def generators(cfg, tmp_path_factory) -> dict[str, VariantGenerator]:
    """The base and three adapters with random non-zero W'_v (adapter on != off), one per training method."""
    root = tmp_path_factory.mktemp("adapters")
    made = {"base": VariantGenerator(cfg, None)}
    for method in ("ppd", "dpo", "sft"):
        adapter = save_random_adapter(cfg.model, root / method, EMBEDDING_SHAPE, method=method)
        made[method] = VariantGenerator(cfg, adapter)
    return made


def _users(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *EMBEDDING_SHAPE)).astype(np.float32)  # [B, L, d]


def test_scale_zero_rows_are_the_base_models_images(generators) -> None:
    base = generators["base"].generate(CAPTIONS, SEEDS)
    for method in ("ppd", "dpo", "sft"):
        off = generators[method].generate(CAPTIONS, SEEDS, _users(2), user_scale=0.0)
        assert np.array_equal(off, base), method
        on = generators[method].generate(CAPTIONS, SEEDS, _users(2))
        assert not np.array_equal(on, base), method  # the adapter is on: these are not the base's images


def test_dpo_grid_shows_the_trained_dpo_model_for_every_user(generators) -> None:
    # Diffusion-DPO is trained for one constant "population" user: its grid rows are that model, whoever the user.
    users = {"user 1": _users(1, seed=1)[0], "user 2": _users(1, seed=2)[0]}
    rows = user_grid_rows(generators["dpo"], CAPTIONS, users)
    assert list(rows) == ["base", "user 1", "user 2"]
    assert np.array_equal(rows["user 1"], rows["user 2"])
    assert not np.array_equal(rows["user 1"], rows["base"])  # conditioning on zeros would give the base here
    assert np.array_equal(rows["base"], generators["base"].generate(CAPTIONS, [0, 1]))


def test_ppd_grid_rows_follow_their_users(generators) -> None:
    users = {"user 1": _users(1, seed=1)[0], "user 2": _users(1, seed=2)[0]}
    rows = user_grid_rows(generators["ppd"], CAPTIONS, users)
    assert not np.array_equal(rows["user 1"], rows["user 2"])
    alone = generators["ppd"].generate(CAPTIONS, [0, 1], np.stack([users["user 2"]] * 2))
    assert np.array_equal(rows["user 2"], alone)


def test_per_row_scales_give_each_row_its_own_scale(generators) -> None:
    # Serve batches requests of different users and scales into one call: a row must not depend on its neighbours.
    users = _users(2)
    mixed = generators["ppd"].generate(CAPTIONS, SEEDS, users, user_scale=[0.0, 1.0])
    first_off = generators["ppd"].generate(CAPTIONS[:1], SEEDS[:1], users[:1], user_scale=0.0)
    second_on = generators["ppd"].generate(CAPTIONS[1:], SEEDS[1:], users[1:], user_scale=1.0)
    # uint8 images: batch-size-dependent fp32 rounding may move a pixel by one level.
    assert np.abs(mixed[:1].astype(int) - first_off.astype(int)).max() <= 1
    assert np.abs(mixed[1:].astype(int) - second_on.astype(int)).max() <= 1


def test_a_personalised_adapter_without_users_is_refused(generators) -> None:
    with pytest.raises(ValueError, match="needs user embeddings"):
        generators["ppd"].generate(CAPTIONS, SEEDS)


def test_the_grid_is_drawn_with_a_row_per_user(generators, tmp_path) -> None:
    from PIL import Image

    path = user_grid(generators["ppd"], CAPTIONS, {"user 1": _users(1)[0]}, tmp_path / "grid.png")
    with Image.open(path) as grid:
        width, height = grid.size
    assert width > height  # 2 captions side by side (plus the row labels), 2 rows (base, user 1)


def test_a_bounded_caption_cache_drops_the_least_recently_used_caption(cfg) -> None:
    generator = VariantGenerator(cfg, None, caption_cache_size=2)
    encoded: list[list[str]] = []  # what reaches the text encoder, call by call
    encode = generator.encoder.encode_captions
    generator.encoder.encode_captions = lambda captions: encoded.append(list(captions)) or encode(captions)
    a, b, c = "a red ring", "a blue cross", "a green square"
    generator.encode_captions([a, b])
    generator.encode_captions([a])  # cached; b is now the least recently used
    generator.encode_captions([c])  # evicts b
    generator.encode_captions([a])  # still cached; c is now the least recently used
    generator.encode_captions([b])  # evicts c
    hidden, pooled = generator.encode_captions([c, a, b, c])  # only c is missing
    assert encoded == [sorted([a, b]), [c], [b], [c]]  # missing captions go to the encoder sorted
    # cached rows are what an uncached generator computes, in the order asked for (to float rounding: the encoder's
    # batches differ)
    expected_hidden, expected_pooled = VariantGenerator(cfg, None).encode_captions([c, a, b, c])
    assert hidden.shape == expected_hidden.shape and pooled.shape == expected_pooled.shape
    assert torch.allclose(hidden, expected_hidden, atol=1e-5) and torch.allclose(pooled, expected_pooled, atol=1e-5)


def test_requests_for_the_same_image_are_drawn_once() -> None:
    def request(request_id, variant="ppd", caption=CAPTIONS[0], seed=3, embedding=(1.0, 0.0), shape=(1, 2)):
        return {
            "request_id": request_id,
            "variant": variant,
            "caption": caption,
            "seed": seed,
            "embedding": None if embedding is None else list(embedding),
            "embedding_shape": None if shape is None else list(shape),
            "user_id": request_id,  # bookkeeping columns do not change the image
        }

    requests = [
        request(10),
        request(11),  # the same image as 10 for another user
        request(12, variant="sft"),
        request(13, caption=CAPTIONS[1]),
        request(14, seed=4),
        request(15, embedding=(0.0, 1.0)),
        request(16, shape=(2, 1)),  # the same numbers read as another [L, d]
        request(17, variant="base", embedding=None, shape=None),
        request(18, variant="base", embedding=None, shape=None),
        request(19, embedding=np.array([1.0, 0.0], np.float32)),  # as an array: still the same image as 10
    ]
    distinct, sources = distinct_images(requests)
    assert [r["request_id"] for r in distinct] == [10, 12, 13, 14, 15, 16, 17]
    assert sources == [10, 10, 12, 13, 14, 15, 16, 17, 17, 10]


def test_a_rows_image_does_not_depend_on_the_rows_beside_it(generators) -> None:
    # What drawing a repeated request once relies on: the first row's image, alone or beside other rows.
    users = _users(3)
    alone = generators["ppd"].generate(CAPTIONS[:1], SEEDS[:1], users[:1])
    beside = generators["ppd"].generate([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]], [SEEDS[0], SEEDS[1], 9], users)
    assert np.abs(alone[0].astype(int) - beside[0].astype(int)).max() <= 1  # one grey level: CPU kernels' rounding
    assert np.abs(beside[0].astype(int) - beside[2].astype(int)).max() > 1  # another seed and user: another image


def test_embeddings_of_another_shape_than_the_adapter_reads_are_refused_before_drawing(cfg, tmp_path) -> None:
    adapters = {
        "ppd_population": save_random_adapter(cfg.model, tmp_path / "ppd", EMBEDDING_SHAPE, method="ppd"),
        "sft": save_random_adapter(cfg.model, tmp_path / "sft", EMBEDDING_SHAPE, method="sft"),
        "dpo": save_random_adapter(cfg.model, tmp_path / "dpo", EMBEDDING_SHAPE, method="dpo"),
    }

    def request(variant: str, shape: tuple[int, int] | None) -> dict:
        return {
            "variant": variant,
            "caption": CAPTIONS[0],
            "seed": 0,
            "embedding_shape": None if shape is None else list(shape),
        }

    fitting = [request("base", None), request("dpo", None), request("ppd_population", EMBEDDING_SHAPE)]
    check_user_embeddings([*fitting, request("sft", EMBEDDING_SHAPE)], adapters)  # nothing to refuse

    with pytest.raises(InputDataError) as refused:
        check_user_embeddings([*fitting, request("ppd_population", (4, 64))], adapters)
    message = str(refused.value)
    assert "'ppd_population'" in message and "[4, 16]" in message and "[4, 64]" in message
    with pytest.raises(InputDataError, match=r"'sft'.*carry none"):
        check_user_embeddings([*fitting, request("sft", None)], adapters)
