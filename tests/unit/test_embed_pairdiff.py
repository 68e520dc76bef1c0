"""Pair-difference embedder: tokens φ(x+) − φ(x−), and a user classifier that tells toy users apart with them."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ppd.config import smoke
from ppd.data.toyworld import write_toy_world
from ppd.embed import load_embedder
from ppd.embed.classify import evaluate_user_classifier
from ppd.embed.groups import FewShotGroup, groups_from_pairs, groups_from_rows
from ppd.embed.pairdiff import TINY_CLIP_VISION_NAME, PairDiffEmbedder, tiny_clip_vision_config


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> PairDiffEmbedder:
    cfg = smoke().with_overrides([f"model.cache_dir={tmp_path_factory.mktemp('models')}", "embed.embedder=pairdiff"])
    return load_embedder(cfg)


@pytest.fixture(scope="module")
def groups(toy_world) -> list[FewShotGroup]:
    pairs = pq.read_table(toy_world / "pairs" / "population").to_pandas()
    return groups_from_rows(groups_from_pairs(pairs, shots=4, seed=0)[:6])


def test_tokens_are_chosen_minus_rejected_per_pair(embedder, groups):
    rows = embedder.embed_groups(groups)
    for group, row in zip(groups, rows, strict=True):
        assert row.embedding.shape == (4, 64) and row.embedding.dtype == np.float32
        assert row.layers == [] and row.model_id == TINY_CLIP_VISION_NAME
        images = group.images()
        for pair, choice in enumerate(group.preferred):  # encode each image on its own: no batching involved
            chosen = embedder.encode_images([images[2 * pair + choice]])[0].numpy()
            rejected = embedder.encode_images([images[2 * pair + 1 - choice]])[0].numpy()
            np.testing.assert_allclose(row.embedding[pair], chosen - rejected, atol=1e-5)


def test_flipping_the_choices_flips_the_tokens(embedder, groups):
    group = groups[0]
    flipped = FewShotGroup(**{**group.__dict__, "preferred": tuple(1 - p for p in group.preferred)})
    original, mirrored = embedder.embed_groups([group, flipped])
    np.testing.assert_allclose(mirrored.embedding, -original.embedding, atol=1e-6)


def test_tiny_encoder_is_deterministic_across_builds(tmp_path, embedder, groups):
    cfg = smoke().with_overrides([f"model.cache_dir={tmp_path}", "embed.embedder=pairdiff"])
    rebuilt = load_embedder(cfg)  # a fresh build from the fixed seed in another folder
    np.testing.assert_array_equal(
        rebuilt.embed_groups(groups[:1])[0].embedding, embedder.embed_groups(groups[:1])[0].embedding
    )


def test_undecodable_image_gives_an_error_row(embedder, groups):
    broken = FewShotGroup(**{**groups[0].__dict__, "jpg_0": (groups[0].jpg_0[0][:20], *groups[0].jpg_0[1:])})
    rows = embedder.embed_groups([broken, groups[1]])
    assert rows[0].embedding is None and "undecodable image" in rows[0].error
    assert rows[1].error is None and rows[1].embedding.shape == (4, 64)


@pytest.mark.slow
def test_classifier_tells_toy_users_apart_well_above_chance(tmp_path, embedder):
    """24 users with random mixed rewards, 128 pairs each (~30 groups of 4): hold out 6 groups per user."""
    cfg = smoke().with_overrides(["data.toy.population_pairs_per_user=128", "data.toy.one_reward_pairs_per_user=8"])
    write_toy_world(tmp_path, cfg.data.toy, seed=1)
    pairs = pq.read_table(tmp_path / "pairs" / "population").to_pandas()
    groups = groups_from_rows(groups_from_pairs(pairs, shots=4, seed=0))
    rows = embedder.embed_groups(groups)
    embeddings = {(row.user_id, row.group_id): row.embedding for row in rows}
    report = evaluate_user_classifier(embeddings, pooling="mean", test_per_user=6, seed=0)
    print(f"pairdiff user classifier: {report.summary()}")
    assert report.n_users == 24 and report.test_groups == 144
    assert report.top_k[1] >= 2 * report.chance[1]
    assert report.top_k[5] >= 2 * report.chance[5]
    assert report.top_k[16] >= report.chance[16] + 0.15


def test_the_tiny_tower_sees_the_toy_worlds_pixels_without_resampling():
    # at another side the processor resamples every toy image first (it halved them when the world went to 32 px)
    side = smoke().data.toy.image_size
    assert tiny_clip_vision_config().image_size == side and TINY_CLIP_VISION_NAME.endswith(f"-{side}px")
