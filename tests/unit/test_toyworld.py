import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ppd.config import ToyWorldConfig
from ppd.data.schema import REQUIRED_COLUMNS
from ppd.data.toyworld import load_hidden_rewards, write_toy_world

SMALL = ToyWorldConfig(one_reward_pairs_per_user=12, population_users=3, population_pairs_per_user=8)


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    write_toy_world(tmp_path / "a", SMALL, seed=3)
    write_toy_world(tmp_path / "b", SMALL, seed=3)
    write_toy_world(tmp_path / "c", SMALL, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (
        _digest(tmp_path / "a")["pairs/population/part-00000.parquet"]
        != _digest(tmp_path / "c")["pairs/population/part-00000.parquet"]
    )


def test_pairs_are_pickapic_and_hide_the_rewards(toy_world):
    hidden = json.loads((toy_world / "hidden" / "rewards.json").read_text())
    weights_text = {f"{w:.6f}" for user in hidden["users"].values() for w in user["weights"] if w not in (0.0, 1.0)}
    for path in (toy_world / "pairs").rglob("*.parquet"):
        table = pq.read_table(path)
        assert set(REQUIRED_COLUMNS) <= set(table.column_names)
        assert not {"weights", "reward", "reward_0", "reward_1"} & set(table.column_names)
        raw = path.read_bytes()
        assert b"weights" not in raw
        assert not any(w.encode() in raw for w in weights_text)
    assert not list((toy_world / "pairs").rglob("*.json"))


def _decode(blobs):
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64) / 255 for b in blobs])


def _preferred_and_rejected(table):
    df = table.to_pandas()
    df = df[df.label_0 != df.label_1]
    win = np.where(df.label_0 == 1.0, df.jpg_0, df.jpg_1)
    lose = np.where(df.label_0 == 1.0, df.jpg_1, df.jpg_0)
    return df, _decode(win), _decode(lose)


@pytest.mark.parametrize(
    ("user_id", "measure"),
    [
        # independent pixel measures, not the generator's own attribute code
        (100, lambda im: im.mean(axis=(1, 2, 3))),  # brightness user
        (103, lambda im: (im[..., 0] - im[..., 2]).mean(axis=(1, 2))),  # warmth user
    ],
)
def test_one_reward_users_prefer_more_of_their_attribute(toy_world, user_id, measure):
    table = pq.read_table(toy_world / "pairs" / "one_reward")
    df, win, lose = _preferred_and_rejected(table.filter(table.column("user_id").to_numpy() == user_id))
    agreement = (measure(win) > measure(lose)).mean()
    assert len(df) >= 30
    assert agreement > 0.75, agreement  # chance is 0.5


def test_population_labels_follow_each_users_hidden_reward(toy_world):
    rewards = load_hidden_rewards(toy_world)
    table = pq.read_table(toy_world / "pairs" / "population")
    df, win, lose = _preferred_and_rejected(table)
    to_uint8 = lambda im: np.round(im * 255).astype(np.uint8)  # noqa: E731
    agree = [
        rewards.reward(int(u), to_uint8(win[m])) > rewards.reward(int(u), to_uint8(lose[m]))
        for u in df.user_id.unique()
        for m in [(df.user_id == u).to_numpy()]
    ]
    assert np.concatenate(agree).mean() > 0.75
    # and the users really differ: one user's reward explains another's labels much worse than its own
    own = np.concatenate(agree).mean()
    users = sorted(df.user_id.unique())
    shifted = np.concatenate(
        [
            rewards.reward(int(v), to_uint8(win[m])) > rewards.reward(int(v), to_uint8(lose[m]))
            for u, v in zip(users, users[1:] + users[:1], strict=True)
            for m in [(df.user_id == u).to_numpy()]
        ]
    ).mean()
    assert shifted < own - 0.15
