"""Properties of the split / group assignment, over random preference tables (hypothesis)."""

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from ppd.config import DataConfig
from ppd.data.prepare import SPLITS, accounting, assemble_group, assign_splits

REASONS = [None, None, None, None, None, None, "tie", "not_different", "undecodable_image"]


@st.composite
def preference_tables(draw):
    n_users = draw(st.integers(1, 12))
    n_captions = draw(st.integers(1, 15))
    rows = draw(
        st.lists(
            st.tuples(st.integers(0, n_users - 1), st.integers(0, n_captions - 1), st.sampled_from(REASONS)),
            min_size=0,
            max_size=160,
        )
    )
    meta = pd.DataFrame(
        {
            "pair_id": range(len(rows)),
            "user_id": [1000 + u for u, _, _ in rows],
            "caption": [f"caption {c}" for _, c, _ in rows],
            "reason": [r for _, _, r in rows],
        }
    )
    cfg = DataConfig(
        shots=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 3)),
        validation_caption_fraction=draw(st.sampled_from([0.0, 0.1, 0.3])),
        test_caption_fraction=draw(st.sampled_from([0.0, 0.2, 0.4])),
        test_unseen_user_fraction=draw(st.sampled_from([0.0, 0.3, 0.5])),
    )
    return meta, cfg


@settings(max_examples=150, deadline=None)
@given(preference_tables())
def test_split_assignment_properties(case):
    meta, cfg = case
    assignment = assign_splits(meta, cfg)
    rows = assignment.rows.merge(meta[["pair_id", "user_id", "caption"]], on="pair_id")

    # every row in exactly one place: a split or a rejection reason, never both, never neither
    in_split = rows["split"].notna()
    assert (in_split ^ rows["reason"].notna()).all()
    report = accounting(len(meta), assignment, {})
    assert report["input_rows"] == sum(report["kept"].values()) + sum(report["rejected"].values())
    assert set(rows.loc[in_split, "split"]) <= set(SPLITS)

    # deterministic for a seed
    again = assign_splits(meta, cfg)
    pd.testing.assert_frame_equal(assignment.rows, again.rows)
    pd.testing.assert_frame_equal(assignment.groups, again.groups)

    # rejected rows for a row-level reason keep that reason
    row_level = meta["reason"].notna()
    assert (assignment.rows.loc[row_level, "reason"].values == meta.loc[row_level, "reason"].values).all()

    by_split = {s: rows[rows["split"] == s] for s in SPLITS}
    train = by_split["train"]
    # no test_unseen user anywhere in train (or validation / test_seen)
    unseen_users = set(by_split["test_unseen"]["user_id"])
    for s in ("train", "validation", "test_seen"):
        assert not unseen_users & set(by_split[s]["user_id"])
    # no caption of a test (or validation) split in train
    for s in ("validation", "test_seen", "test_unseen"):
        assert not set(by_split[s]["caption"]) & set(train["caption"])
    # users below `shots` usable pairs are dropped entirely
    usable_counts = meta[meta["reason"].isna()].groupby("user_id").size()
    small = set(usable_counts[usable_counts < cfg.shots].index)
    assert not small & set(rows.loc[in_split, "user_id"])

    # groups: `shots` distinct pairs of one user, disjoint, drawn from train (seen) or test_unseen (unseen) pairs
    split_of = dict(zip(rows["pair_id"], rows["split"], strict=True))
    user_of = dict(zip(rows["pair_id"], rows["user_id"], strict=True))
    members = [p for pids in assignment.groups["pair_ids"] for p in pids]
    assert len(members) == len(set(members))
    for _, group in assignment.groups.iterrows():
        assert len(group["pair_ids"]) == cfg.shots
        assert {user_of[p] for p in group["pair_ids"]} == {group["user_id"]}
        assert {split_of[p] for p in group["pair_ids"]} <= {"train", "test_unseen"}
    # a pair is never conditioned on a group that contains it, and only on its own user's groups
    group_members = dict(zip(assignment.groups["group_id"], assignment.groups["pair_ids"], strict=True))
    group_user = dict(zip(assignment.groups["group_id"], assignment.groups["user_id"], strict=True))
    conditioned = rows[rows["condition_group_id"].notna()]
    for pair_id, user_id, gid in zip(
        conditioned["pair_id"], conditioned["user_id"], conditioned["condition_group_id"], strict=True
    ):
        assert pair_id not in group_members[int(gid)]
        assert group_user[int(gid)] == user_id
    # rejected pairs are neither in groups nor conditioned
    assert rows.loc[~in_split, "condition_group_id"].isna().all()
    assert not set(rows.loc[~in_split, "pair_id"]) & set(members)


def test_a_pair_is_conditioned_whenever_its_user_has_another_group():
    # one seen user, 12 usable pairs on training captions, shots 4 -> 3 groups: every pair has another group
    meta = pd.DataFrame({"pair_id": range(12), "user_id": 5, "caption": [f"c{i}" for i in range(12)], "reason": None})
    cfg = DataConfig(shots=4, validation_caption_fraction=0, test_caption_fraction=0, test_unseen_user_fraction=0)
    assignment = assign_splits(meta, cfg)
    assert len(assignment.groups) == 3
    assert assignment.rows["condition_group_id"].notna().all()


def test_a_group_becomes_one_row_with_its_members_in_the_group_order() -> None:
    members = pd.DataFrame(
        {
            "context_group_id": [4, 4, 4],
            "pair_id": [10, 11, 12],
            "user_id": [7, 7, 7],
            "caption": ["a", "b", "c"],
            "jpg_0": [b"0a", b"0b", b"0c"],
            "jpg_1": [b"1a", b"1b", b"1c"],
            "preferred": [0, 1, 0],
        }
    )
    row = assemble_group(members, order={4: [12, 10, 11]}, pools={4: "train"}).iloc[0]
    assert (row.group_id, row.user_id, row.pool) == (4, 7, "train")
    assert row.pair_ids == [12, 10, 11] and row.captions == ["c", "a", "b"]
    assert row.jpg_0 == [b"0c", b"0a", b"0b"] and row.jpg_1 == [b"1c", b"1a", b"1b"] and row.preferred == [0, 0, 1]
