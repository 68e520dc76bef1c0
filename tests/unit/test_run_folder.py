"""A training run's folder continues only the same config; where its models are cached or where it logs may change."""

from __future__ import annotations

import pytest

from ppd.config import load_config
from ppd.train.run_folder import OtherRunInFolder, read_run_record, write_run_record


def test_a_rerun_continues_with_another_cache_folder_or_more_steps_but_not_another_setting(tmp_path) -> None:
    cfg = load_config("smoke", ["model.cache_dir=/jobs/copy-1/.cache/ppd/models"])
    write_run_record(tmp_path, cfg, "run-1")
    # A Ray job's copy of the repository moves when its files change: the cache folder, made absolute, moves with it.
    moved = cfg.with_overrides(["model.cache_dir=/jobs/copy-2/.cache/ppd/models", "train.max_steps=160"])
    assert read_run_record(tmp_path, moved)["run_id"] == "run-1"
    with pytest.raises(OtherRunInFolder):
        read_run_record(tmp_path, cfg.with_overrides(["train.lr=1e-3"]))
