"""Evaluation helpers around the statistics: object diagnostics, classifier summary, the train job's user filter."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ppd.data.toyworld import caption_grammar, render, sample_scene_params
from ppd.eval.evaluate import object_diagnostics


def test_object_diagnostics_tells_drawn_objects_from_flat_images() -> None:
    rng = np.random.default_rng(1)
    drawn = render(caption_grammar()[:8], sample_scene_params(rng, 8), 32)  # [8, 32, 32, 3], each with its object
    flat = np.full((8, 32, 32, 3), 120, np.uint8)
    faint = flat.copy()
    faint[:, 15, 15] = 140  # one barely different pixel: noise, not an object
    report = object_diagnostics(
        ["drawn"] * 8 + ["flat"] * 8 + ["faint"] * 8, np.concatenate([drawn, flat, faint]), 32, 0
    )
    assert report["drawn"]["object_rate"] == 1.0 and report["toy_world"]["object_rate"] >= 0.95
    assert report["flat"]["object_rate"] == 0.0 and report["faint"]["object_rate"] == 0.0
    assert report["flat"]["mean_size"] == report["faint"]["mean_size"] == 0.0 < report["drawn"]["mean_size"]


def test_classifier_summary_reads_k16_or_the_largest_k() -> None:
    from ppd.embed.classify import classifier_summary

    full = {
        "n_users": 30,
        "top_k": {str(k): k / 20 for k in range(1, 17)},
        "chance": {str(k): k / 30 for k in range(1, 17)},
    }
    summary = classifier_summary(full, "pairdiff")
    assert (summary["top16"], summary["chance16"], summary["k"], summary["users"]) == (0.8, 16 / 30, 16, 30)
    few = {"n_users": 5, "top_k": {"1": 0.4, "2": 0.6, "10": 0.9}, "chance": {"1": 0.2, "2": 0.4, "10": 1.0}}
    assert classifier_summary(few, "onehot")["k"] == 10  # fewer than 16 users: the largest k, named


def test_train_users_filter_keeps_only_their_pairs(tmp_path) -> None:
    from ppd.train.data import count_user_rows, keep_users

    table = pa.table({"pair_id": [1, 2, 3, 4, 5], "user_id": pa.array([100, 101, 100, 102, 101], pa.int64())})
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)
    assert count_user_rows([str(path)], [100]) == 2 and count_user_rows([str(path)], [101, 102]) == 3
    assert count_user_rows([str(path)], [7]) == 0
    kept = keep_users(table, [101, 102])
    assert kept.column("pair_id").to_pylist() == [2, 4, 5]  # order kept: resume positions stay valid
