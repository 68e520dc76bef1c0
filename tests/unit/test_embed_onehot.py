import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ppd.embed import read_embeddings
from ppd.embed.onehot import one_hot_embedding, one_hot_index, write_one_hot_embeddings
from ppd.eval.toy_experiments import OneRewardUsers


def test_one_hot_rows_round_trip_and_match_the_evaluation_layout(tmp_path):
    groups = tmp_path / "groups"
    groups.mkdir()
    table = pa.table({"user_id": [104, 100, 102, 100], "group_id": [0, 1, 2, 3], "pair_ids": [[1], [2], [3], [4]]})
    pq.write_table(table, groups / "part.parquet")
    assert write_one_hot_embeddings(groups, tmp_path / "emb") == 4
    stored = read_embeddings(tmp_path / "emb")
    # users in ascending id order: 100 -> e0, 102 -> e1, 104 -> e2
    assert np.array_equal(stored[(100, 1)], [[1, 0, 0]]) and np.array_equal(stored[(100, 3)], [[1, 0, 0]])
    assert np.array_equal(stored[(102, 2)], [[0, 1, 0]])
    assert np.array_equal(stored[(104, 0)], [[0, 0, 1]])
    # the evaluation builds its embeddings with the same layout, whatever order it lists the users in
    evaluation = OneRewardUsers([104, 100, 102])
    assert np.array_equal(evaluation.one_hot({100: 1.0}), stored[(100, 1)])
    assert np.allclose(evaluation.one_hot({100: 0.25, 104: 0.75}), [[0.25, 0, 0.75]])
    assert one_hot_embedding(one_hot_index([5, 3]), {3: 1.0}).shape == (1, 2)
