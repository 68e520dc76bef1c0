"""Training through Ray Train + DeepSpeed on the tiny Stage C: ZeRO-2 on 2 workers, ZeRO-3, resuming a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from ppd.models.checkpoint import frozen_base_digest, load_adapter
from ppd.models.factory import build_personalized_stage_c
from ppd.train.data import PrecomputedInputs
from ppd_ray.jobs.train import run as train
from ppd_ray.jobs.train_worker import TRAIN_STATE_FILE
from tests.helpers import (
    EMBEDDING_SHAPE,
    baseline_config,
)


def _fresh_model(cfg, seed: int):
    torch.manual_seed(seed)  # the workers' adapter init
    return build_personalized_stage_c(cfg.model, EMBEDDING_SHAPE)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def test_two_worker_zero2_run_trains_every_adapter_tensor_and_never_the_base(baseline, smoke_config, inputs):
    assert baseline["steps"] == 18
    assert math.isfinite(baseline["final_metrics"]["loss"])
    assert 0 <= baseline["final_metrics"]["implicit_accuracy"] <= 1

    # every trainable tensor moved away from the initialisation the workers started from
    initial = _fresh_model(smoke_config, smoke_config.train.seed).adapter.state_dict()
    trained = _adapter(baseline["out"] / "adapter")
    assert trained.keys() == initial.keys()
    unchanged = [name for name, tensor in initial.items() if torch.equal(tensor, trained[name])]
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"

    # the frozen base: identical to the pretrained one at the start and at the end of training
    checkpoint = Path(baseline["checkpoint"])
    state = json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
    pristine = frozen_base_digest(_fresh_model(smoke_config, 0))
    assert state["base_sha256_at_start"] == state["base_sha256"] == pristine
    assert state["global_step"] == 18 and state["micro_step"] == 36

    # the exported adapter loads; adapter off is still exactly the base model, adapter on now differs from it
    model = _fresh_model(smoke_config, 0)
    load_adapter(model, baseline["out"] / "adapter", architecture="tiny")
    batch = PrecomputedInputs(inputs.precomputed).batch(_first_rows(inputs, 4))
    args = (batch["latents_win"], torch.full((4,), 0.5), batch["clip_text_pooled"], batch["clip_text_hidden"])
    with torch.no_grad():
        base_out = _fresh_model(smoke_config, 0).base(*args[:2], args[2], args[3], clip_img=torch.zeros(4, 1, 32))
        assert torch.equal(model(*args, user_embedding=None), base_out.sample)
        assert not torch.allclose(model(*args, user_embedding=batch["user_embedding"]), base_out.sample)

    # checkpoints every 6 steps, the latest 2 kept
    kept = sorted(p.name for p in checkpoint.parent.glob("step-*"))
    assert kept == ["step-00000012", "step-00000018"]


def _first_rows(inputs, count: int):
    import pyarrow.parquet as pq

    from ppd.train.data import PrecomputedManifest

    manifest = PrecomputedManifest.read(inputs.precomputed)
    # all files: how many rows the first one holds depends on Ray Data's blocks (it can be fewer than `count`)
    return pq.read_table(manifest.split_paths(inputs.precomputed, "train")).slice(0, count)


def test_zero3_partitions_and_still_trains(smoke_config, inputs, tracking, tmp_path):
    cfg = baseline_config(smoke_config, tracking, "train.zero_stage=3", "train.max_steps=2", "train.checkpoint_every=2")
    result = train(cfg, inputs.precomputed, tmp_path / "zero3")
    assert result.steps == 2 and math.isfinite(result.final_metrics["loss"])
    initial = _fresh_model(smoke_config, smoke_config.train.seed).adapter.state_dict()
    trained = _adapter(result.adapter_dir)  # gathered from the partitions before export
    assert {k: tuple(v.shape) for k, v in trained.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    load_adapter(_fresh_model(smoke_config, 0), result.adapter_dir, architecture="tiny")


@pytest.mark.slow
def test_a_rerun_with_more_steps_resumes_at_the_checkpoint_and_matches_an_uninterrupted_run(
    baseline, smoke_config, inputs, tracking, tmp_path
):
    out = tmp_path / "resumed"
    first = train(baseline_config(smoke_config, tracking, "train.max_steps=6"), inputs.precomputed, out)
    assert first.steps == 6
    second = train(baseline_config(smoke_config, tracking), inputs.precomputed, out)  # 18 steps, same folder
    assert second.run_id == first.run_id  # the same MLflow run continues

    client = MlflowClient(tracking)
    # the step counter continued (each step logged once), and every step read exactly the rows the uninterrupted
    # run read at that step: the data position was restored, not restarted or skipped
    resumed = {m.step: m.value for m in client.get_metric_history(second.run_id, "pair_id_checksum")}
    reference = {m.step: m.value for m in client.get_metric_history(baseline["run_id"], "pair_id_checksum")}
    assert sorted(resumed) == list(range(1, 19)) and resumed == reference
    losses = {m.step: m.value for m in client.get_metric_history(second.run_id, "loss")}
    reference_losses = {m.step: m.value for m in client.get_metric_history(baseline["run_id"], "loss")}
    assert all(losses[s] == pytest.approx(reference_losses[s], rel=1e-5) for s in range(7, 19))

    # same seeds, same rows, same draws: the final adapter equals the uninterrupted run's
    resumed_adapter, reference_adapter = _adapter(second.adapter_dir), _adapter(baseline["out"] / "adapter")
    for name, tensor in reference_adapter.items():
        torch.testing.assert_close(resumed_adapter[name], tensor, rtol=0, atol=1e-6)


def test_a_run_on_one_users_pairs_reproduces(smoke_config, inputs, tracking, tmp_path):
    """A per-user run (the demo's DPO upper bounds) reads that user's pairs in the same order every time: before the
    rows were sorted by their order key, each run of the demo's upper bounds ended with a different adapter."""
    import pyarrow.parquet as pq

    users = pq.read_table(sorted((Path(inputs.precomputed) / "train").glob("*.parquet")), columns=["user_id"])
    user = int(users.column("user_id")[0].as_py())
    overrides = ["train.num_workers=1", "train.max_steps=3", "train.checkpoint_every=3", f"train.users=[{user}]"]
    cfg = baseline_config(smoke_config, tracking, *overrides)
    first, second = (train(cfg, inputs.precomputed, tmp_path / name) for name in ("first", "second"))
    a, b = _adapter(first.adapter_dir), _adapter(second.adapter_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.final_metrics["pair_id_checksum"] == second.final_metrics["pair_id_checksum"]
