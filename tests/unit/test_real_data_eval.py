"""Real-data evaluation pieces: users and captions from a prepared folder, reward win rates, selection, the judge
on generated pairs, and PickScore on the tiny CLIP."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ppd.config import EvalConfig
from ppd.embed.groups import FewShotGroup
from ppd.eval.image_rewards import load_image_rewards, tiny_clip_reward_dir
from ppd.eval.judge import JudgeQuery
from ppd.eval.real_data import (
    BASE,
    evaluated_users,
    judge_generated,
    real_requests,
    select_variant,
    summarise_rewards,
)
from tests.helpers import solid_png


def _prepared(tmp_path):
    """test_seen rows of users 1-3 and their condition groups (group 12 holds caption 'c')."""
    (tmp_path / "test_seen").mkdir()
    (tmp_path / "groups").mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": [1, 1, 1, 2, 2, 3],
                "caption": ["a", "b", "c", "a", "d", "e"],
                "condition_group_id": [10, 10, 12, 20, 20, None],
            }
        ),
        tmp_path / "test_seen" / "part-0.parquet",
    )
    pq.write_table(
        pa.table({"group_id": [10, 12, 20], "captions": [["x", "y"], ["c", "z"], ["a", "d"]]}),
        tmp_path / "groups" / "part-0.parquet",
    )
    return tmp_path


def test_evaluated_users_need_an_embedded_group_and_keep_captions_outside_it(tmp_path) -> None:
    prepared = _prepared(tmp_path)
    catalog = {(1, 10): (2, 4), (1, 12): (2, 4), (2, 20): (2, 4)}
    users = evaluated_users(prepared, "test_seen", count=10, seed=0, available_groups=catalog).set_index("user_id")
    assert set(users.index) == {1}  # user 2's group holds both its captions; user 3 has no condition group
    assert users.loc[1, "group_id"] == 10 and sorted(users.loc[1, "captions"]) == ["a", "b", "c"]
    only_other_group = evaluated_users(prepared, "test_seen", 10, 0, {(1, 12): (2, 4)}).set_index("user_id")
    assert sorted(only_other_group.loc[1, "captions"]) == ["a", "b"]  # 'c' is in the conditioning group
    assert evaluated_users(prepared, "test_unseen", 10, 0, catalog).empty  # a split without files


def test_requests_pair_every_variant_with_the_base_on_the_same_seeds() -> None:
    users = pd.DataFrame(
        [{"user_id": 1, "split": "test_seen", "group_id": 10, "captions": ["a", "b", "c"]}],
    )
    embedding = np.arange(8, dtype=np.float32).reshape(2, 4)
    requests = real_requests(users, {(1, 10): embedding}, ["ppd_beta2", "dpo"], captions_per_user=2, seeds=[5, 6])
    assert len(requests) == 3 * 2 * 2 and [r["request_id"] for r in requests] == list(range(12))
    assert [r["variant"] for r in requests] == sorted(r["variant"] for r in requests)
    for request in requests:
        if request["variant"] == BASE:
            assert request["embedding"] is None
        else:
            np.testing.assert_array_equal(np.reshape(request["embedding"], request["embedding_shape"]), embedding)
    assert {(r["caption"], r["seed"]) for r in requests if r["variant"] == "dpo"} == {
        (c, s) for c in ("a", "b") for s in (5, 6)
    }


def _scored() -> pd.DataFrame:
    # Two users, two captions each, one seed; variant "up" beats the base on 3 of 4 images, "same" ties everywhere.
    rows, request_id = [], 0
    base_scores = {(1, "a"): 1.0, (1, "b"): 2.0, (2, "a"): 3.0, (2, "c"): 4.0}
    for (user, caption), score in base_scores.items():
        for variant, value in (
            (BASE, score),
            ("up", score + (1.0 if (user, caption) != (2, "c") else -1.0)),
            ("same", score),
        ):
            rows.append(
                {
                    "request_id": request_id,
                    "variant": variant,
                    "user_id": user,
                    "split": "test_seen" if user == 1 else "test_unseen",
                    "group_id": 10 * user,
                    "caption": caption,
                    "seed": 0,
                    "image_reward.pickscore": value,
                    "image_reward.aesthetic": -value,
                }
            )
            request_id += 1
    return pd.DataFrame(rows)


def test_reward_summary_means_win_rates_and_the_selection() -> None:
    summary = summarise_rewards(_scored(), samples=200, seed=0)
    assert set(summary) == {"test_seen", "test_unseen", "all"}
    pick = summary["all"]["pickscore"]
    assert pick["mean"] == {BASE: 2.5, "up": 3.0, "same": 2.5}  # (2 + 3 + 4 + 3) / 4
    assert pick["win_rate_vs_base"]["up"]["value"] == 0.75 and pick["win_rate_vs_base"]["up"]["n"] == 4
    assert pick["win_rate_vs_base"]["same"]["value"] == 0.5  # every comparison a tie
    assert summary["test_seen"]["pickscore"]["win_rate_vs_base"]["up"]["value"] == 1.0
    assert summary["test_unseen"]["pickscore"]["win_rate_vs_base"]["up"]["value"] == 0.5
    assert summary["all"]["aesthetic"]["win_rate_vs_base"]["up"]["value"] == 0.25
    selected = select_variant(summary, "pickscore")
    assert selected["best"] == "up" and selected["base"] == 2.5
    assert select_variant(summary, "aesthetic")["best"] == "same"  # the base is never selected
    assert select_variant(summary, "hps") is None


def _png(value: int) -> bytes:
    return solid_png((value, value, value), 4)


def test_the_judge_sees_the_users_group_and_both_orders_once_per_pair() -> None:
    scored = _scored()
    # Image brightness follows the PickScore column: a "brighter is better" judge agrees with it.
    pngs = dict(zip(scored["request_id"], (_png(int(40 * v)) for v in scored["image_reward.pickscore"]), strict=True))
    groups = {
        g: FewShotGroup(g, g // 10, (0,), (f"context of user {g // 10}",), (_png(0),), (_png(255),), (1,))
        for g in sorted(set(scored["group_id"]))
    }
    seen: list[tuple[JudgeQuery, bool]] = []

    def brighter(query: JudgeQuery, swapped: bool) -> int:
        seen.append((query, swapped))
        first, second = (query.image_b, query.image_a) if swapped else (query.image_a, query.image_b)
        level = [np.asarray(Image.open(io.BytesIO(data))).mean() for data in (first, second)]
        return 0 if level[0] > level[1] else 1  # a tie -> the second shown in both orders: inconsistent, dropped

    report = judge_generated(scored, pngs, groups, brighter, samples=200, seed=0)
    assert report["all"]["up"]["win_rate"]["value"] == 0.75 and report["all"]["up"]["kept"] == 4
    assert report["test_seen"]["up"]["win_rate"]["value"] == 1.0
    assert report["all"]["same"]["kept"] == 0 and report["all"]["same"]["dropped_share"] == 1.0
    assert len(seen) == 2 * 4 * 2  # 2 variants x 4 pairs x both orders: the splits reuse the verdicts
    for query, _ in seen:  # each query carries its own user's group
        assert query.context_captions == (f"context of user {query.user_id}",)


def test_pickscore_is_the_models_temperature_times_the_cosine(tmp_path) -> None:
    tiny = tiny_clip_reward_dir(tmp_path / "models")
    # The processor may live in another folder (PickScore's is laion/CLIP-ViT-H-14's): split the tiny one in two.
    weights_only, processor_only = tmp_path / "weights", tmp_path / "processor"
    weights_only.mkdir()
    processor_only.mkdir()
    for item in tiny.iterdir():
        is_weights = item.name in ("config.json", "model.safetensors")
        shutil.copy2(item, (weights_only if is_weights else processor_only) / item.name)
    cfg = EvalConfig(
        image_rewards=("pickscore", "hps"),
        pickscore_path=str(weights_only),
        pickscore_processor_path=str(processor_only),
        hps_path=str(tiny),
    )
    rewards = load_image_rewards(cfg, tmp_path / "unused")
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    captions = ["a red ring", "a blue star", "a"]
    temperature = float(rewards["pickscore"].model.logit_scale.detach().exp())
    assert temperature == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial logit scale: log(1 / 0.07)
    np.testing.assert_allclose(
        rewards["pickscore"].score(images, captions),
        rewards["hps"].score(images, captions) / 100 * temperature,
        rtol=1e-5,
    )


def test_the_judge_sees_images_shrunk_to_its_side() -> None:
    import base64

    from ppd.eval.judge import chat_messages

    big = io.BytesIO()
    Image.new("RGB", (1024, 768), (10, 20, 30)).save(big, format="JPEG")
    query = JudgeQuery(("c",), (big.getvalue(),), (_png(9),), (0,), "new", big.getvalue(), _png(200))
    sizes = []
    for part in chat_messages(query, swapped=False, max_image_side=384)[0]["content"]:
        if part["type"] == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            sizes.append(Image.open(io.BytesIO(data)).size)
    assert sizes == [(384, 288), (4, 4), (384, 288), (4, 4)]  # large ones shrunk (aspect kept), small ones as sent
    unshrunk = chat_messages(query, swapped=False)[0]["content"]
    assert sum(part["type"] == "image_url" for part in unshrunk) == 4
