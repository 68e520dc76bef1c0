"""Embedding rows on disk (resume bookkeeping, [L, d] round trip), layer specs, and top-k accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from ppd.embed.base import EmbeddingIdentity, EmbeddingRow, resolve_layers
from ppd.embed.classify import split_by_user, top_k_accuracy
from ppd.embed.store import done_group_ids, part_files, read_embeddings, read_rows, write_part

IDENTITY = EmbeddingIdentity("vlm-hf", "tiny", "abc123", (0, 2), {"temperature": 0.7})


def _rows(identity: EmbeddingIdentity, group_ids, rng) -> list[EmbeddingRow]:
    return [
        EmbeddingRow(
            user_id=100 + g % 3,
            group_id=g,
            pair_ids=[4 * g + i for i in range(4)],
            embedding=rng.standard_normal((len(identity.layers) or 4, 8)).astype(np.float32),
            profile=f"profile {g}",
            layers=list(identity.layers),
            model_id=identity.model_id,
            prompt_hash=identity.prompt_hash,
            settings=identity.settings_json,
        )
        for g in group_ids
    ]


def test_embeddings_round_trip_as_l_by_d_arrays(tmp_path):
    rng = np.random.default_rng(0)
    rows = _rows(IDENTITY, range(5), rng)
    write_part(rows[:2], tmp_path, IDENTITY)
    write_part(rows[2:], tmp_path, IDENTITY)
    assert len(part_files(tmp_path)) == 2
    stored = read_embeddings(tmp_path)
    assert set(stored) == {(r.user_id, r.group_id) for r in rows}
    for row in rows:
        np.testing.assert_array_equal(stored[(row.user_id, row.group_id)], row.embedding)
        assert stored[(row.user_id, row.group_id)].shape == (2, 8)
    table = read_rows(tmp_path)
    assert table.column("embedding_shape").to_pylist()[0] == [2, 8]
    assert sorted(table.column("profile").to_pylist()) == [f"profile {g}" for g in range(5)]


def test_done_ids_only_count_the_same_identity_and_include_error_rows(tmp_path):
    rng = np.random.default_rng(1)
    other_prompt = EmbeddingIdentity("vlm-hf", "tiny", "def456", (0, 2), {"temperature": 0.7})
    other_layers = EmbeddingIdentity("vlm-hf", "tiny", "abc123", (2,), {"temperature": 0.7})
    rows = _rows(IDENTITY, [1, 2], rng)
    rows.append(
        EmbeddingRow(
            user_id=7,
            group_id=3,
            pair_ids=[],
            embedding=None,
            error="undecodable",
            model_id="tiny",
            prompt_hash="abc123",
            layers=[0, 2],
            settings=IDENTITY.settings_json,
        )
    )
    write_part(rows, tmp_path, IDENTITY)
    write_part(_rows(other_prompt, [4], rng), tmp_path, other_prompt)
    write_part(_rows(other_layers, [5], rng), tmp_path, other_layers)
    assert done_group_ids(tmp_path, IDENTITY) == {1, 2, 3}
    assert done_group_ids(tmp_path, other_prompt) == {4}
    assert done_group_ids(tmp_path, other_layers) == {5}
    assert done_group_ids(tmp_path / "missing", IDENTITY) == set()
    # a folder mixing kinds of embeddings must be narrowed before use
    with pytest.raises(ValueError, match="mixes 3 kinds"):
        read_embeddings(tmp_path)
    assert set(read_embeddings(tmp_path, prompt_hash="def456")) == {(101, 4)}
    with pytest.raises(ValueError, match="mixes 2 kinds"):  # same model and prompt, different layers
        read_embeddings(tmp_path, prompt_hash="abc123")


def test_a_killed_writer_leaves_no_readable_part(tmp_path):
    (tmp_path / ".part-x.parquet.123.tmp").write_bytes(b"half a file")
    assert part_files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no embedding part files"):
        read_embeddings(tmp_path)


def test_identity_key_changes_with_each_component():
    keys = {
        IDENTITY.key,
        EmbeddingIdentity("vlm-vllm", "tiny", "abc123", (0, 2), {"temperature": 0.7}).key,
        EmbeddingIdentity("vlm-hf", "other", "abc123", (0, 2), {"temperature": 0.7}).key,
        EmbeddingIdentity("vlm-hf", "tiny", "abc124", (0, 2), {"temperature": 0.7}).key,
        EmbeddingIdentity("vlm-hf", "tiny", "abc123", (0,), {"temperature": 0.7}).key,
        EmbeddingIdentity("vlm-hf", "tiny", "abc123", (0, 2), {"temperature": 0.0}).key,
    }
    assert len(keys) == 6


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [("last", 29, [28]), ("all", 3, [0, 1, 2]), ([0, -1], 29, [0, 28]), ([-29], 29, [0])],
)
def test_resolve_layers(spec, n, expected):
    assert resolve_layers(spec, n) == expected


@pytest.mark.parametrize("spec", [[29], [-30], [], "first"])
def test_resolve_layers_refuses_bad_specs(spec):
    with pytest.raises(ValueError):
        resolve_layers(spec, 29)


def test_top_k_accuracy_by_hand():
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2]])
    labels = np.array([0, 0, 2])  # ranks of the true label: 0, 2, 1
    assert top_k_accuracy(scores, labels, [1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_split_keeps_users_with_most_groups_and_holds_out_per_user():
    group_users = {g: u for g, u in enumerate([1] * 5 + [2] * 3 + [3] * 1 + [4] * 4)}
    users, train, test = split_by_user(group_users, max_users=2, test_per_user=1, seed=0)
    assert users == [1, 4]
    assert len(test) == 2 and len(train) == 7
    assert {group_users[g] for g in test} == {1, 4} and not set(train) & set(test)
