"""Real-image rewards on a tiny random CLIP: deterministic, batch invariant, caption-sensitive, safetensors only."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ppd.config import EvalConfig
from ppd.eval.image_rewards import (
    AESTHETIC_HEAD_FILE,
    AestheticHead,
    AestheticReward,
    ClipSimilarityReward,
    load_aesthetic_head,
    load_image_rewards,
    tiny_clip_reward_dir,
)

CAPTIONS = [
    "a picture of a red ring",
    "a",
    "an image showing a small teal star on a pale background in the corner",
    "a picture of a blue cross",
    "a picture of a red ring",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_clip_reward_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def rewards(tiny_dir):
    return load_image_rewards(EvalConfig(), tiny_dir.parent)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # [B, H, W, 3], the toy world's size
    batch[4] = batch[0]  # the same image twice, with the same caption: must score the same within one batch
    return batch


def test_every_configured_reward_is_built_from_the_tiny_clip(rewards, tiny_dir):
    assert set(rewards) == {"clip_score", "aesthetic", "hps"}
    assert {name: reward.name for name, reward in rewards.items()} == {n: n for n in rewards}
    assert list(load_image_rewards(EvalConfig(image_rewards=("aesthetic",)), tiny_dir.parent)) == ["aesthetic"]


def test_a_checkpoint_missing_weights_is_refused(tiny_dir, tmp_path):
    """A converted checkpoint with off key names must not load as a randomly initialised model."""
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_dir, folder)
    state = load_file(folder / "model.safetensors")
    save_file(
        {k.replace("visual_projection", "image_projection"): v for k, v in state.items()}, folder / "model.safetensors"
    )
    with pytest.raises(ValueError, match="visual_projection"):
        ClipSimilarityReward("hps", str(folder), clip_at_zero=False)
    with pytest.raises(ValueError, match="visual_projection"):
        AestheticReward(str(folder), tiny_dir / AESTHETIC_HEAD_FILE)


def test_scores_are_float64_per_image(rewards, images):
    for reward in rewards.values():
        scores = reward.score(images, CAPTIONS)
        assert scores.shape == (len(images),) and scores.dtype == np.float64 and np.isfinite(scores).all()
        assert reward.score(images[:0], []).shape == (0,)


def test_same_inputs_same_scores_across_loads(rewards, images, tiny_dir):
    again = load_image_rewards(EvalConfig(), tiny_dir.parent)
    for name, reward in rewards.items():
        np.testing.assert_array_equal(reward.score(images, CAPTIONS), again[name].score(images, CAPTIONS))


def test_batch_scores_equal_one_by_one(rewards, images):
    # Captions of different lengths pad differently in a batch than alone: padding must not leak into the embedding.
    # CLIP-type scores are 100 * cosine: 1e-5 in cosine (float32 matmuls of other batch shapes) is 1e-3 in score.
    tolerance = {"clip_score": 1e-3, "hps": 1e-3, "aesthetic": 1e-5}
    for name, reward in rewards.items():
        batched = reward.score(images, CAPTIONS)
        single = np.concatenate([reward.score(images[i : i + 1], CAPTIONS[i : i + 1]) for i in range(len(images))])
        np.testing.assert_allclose(batched, single, rtol=0, atol=tolerance[name], err_msg=name)
        assert batched[0] == pytest.approx(batched[4], abs=tolerance[name])


def test_reward_batches_larger_than_one_forward_match(tiny_dir, images):
    small = ClipSimilarityReward("hps", str(tiny_dir), clip_at_zero=False, batch_size=2)
    large = ClipSimilarityReward("hps", str(tiny_dir), clip_at_zero=False, batch_size=64)
    np.testing.assert_allclose(small.score(images, CAPTIONS), large.score(images, CAPTIONS), rtol=0, atol=1e-3)


def test_clip_score_reads_the_caption_and_is_the_clipped_similarity(rewards, images):
    one_image = np.repeat(images[:1], 4, axis=0)  # [4, H, W, 3]
    captions = ["a picture of a red ring", "a picture of a blue star", "bright", "a dark green square in a corner"]
    similarity = rewards["hps"].score(one_image, captions)  # same tiny checkpoint, unclipped
    assert len(np.unique(np.round(similarity, 4))) == len(captions)  # the text tower matters
    assert (np.abs(similarity) <= 100 + 1e-4).all()  # 100 * cosine
    np.testing.assert_allclose(rewards["clip_score"].score(one_image, captions), np.maximum(similarity, 0), atol=1e-5)


def test_aesthetic_reads_pixels_not_captions(rewards, images):
    aesthetic = rewards["aesthetic"]
    scores = aesthetic.score(images[:4], CAPTIONS[:4])
    assert len(np.unique(scores)) == 4
    np.testing.assert_array_equal(scores, aesthetic.score(images[:4], ["other"] * 4))


def test_bad_batches_are_clear_errors(rewards, images):
    with pytest.raises(ValueError, match="uint8"):
        rewards["clip_score"].score(images.astype(np.float32), CAPTIONS)
    with pytest.raises(ValueError, match="captions"):
        rewards["hps"].score(images, CAPTIONS[:2])


def test_aesthetic_head_has_the_public_predictors_layout(tmp_path):
    head = AestheticHead(768)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }
    path = tmp_path / "head.safetensors"
    save_file(head.state_dict(), path)
    embeds = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)  # [B, 768]
    with torch.no_grad():
        torch.testing.assert_close(load_aesthetic_head(path, 768)(embeds), head.eval()(embeds))


def test_aesthetic_head_with_wrong_shapes_is_refused(tiny_dir, tmp_path):
    state = load_file(tiny_dir / AESTHETIC_HEAD_FILE)
    wrong = dict(state, **{"layers.2.weight": torch.zeros(64, 1024)})
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"layers\.2\.weight"):
        load_aesthetic_head(tmp_path / "wrong.safetensors", 32)
    missing = {k: v for k, v in state.items() if k != "layers.7.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers\.7\.bias'\]"):
        load_aesthetic_head(tmp_path / "missing.safetensors", 32)
    with pytest.raises(ValueError, match="768-d"):  # the tiny head under a ViT-L/14-sized embedding
        load_aesthetic_head(tiny_dir / AESTHETIC_HEAD_FILE, 768)


class _Tripwire:
    """Unpickling this creates a file: proof that a loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_never_unpickled(tiny_dir, tmp_path):
    marker = tmp_path / "unpickled"
    for name in ("head.pth", "head.bin", "head.safetensors"):  # the last: a pickle under a safetensors name
        (tmp_path / name).write_bytes(pickle.dumps(_Tripwire(marker)))
        with pytest.raises(ValueError):
            load_aesthetic_head(tmp_path / name, 32)
    # A CLIP folder holding only a pickled pytorch_model.bin is refused, not loaded.
    folder = tmp_path / "pickled-clip"
    shutil.copytree(tiny_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(OSError):
        ClipSimilarityReward("clip_score", str(folder), clip_at_zero=True)
    with pytest.raises(OSError):
        AestheticReward(str(folder), tiny_dir / AESTHETIC_HEAD_FILE)
    assert not marker.exists()
