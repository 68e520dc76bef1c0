"""MLflow tracking of training runs against a real `mlflow server` on loopback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from PIL import Image
from typer.testing import CliRunner

from ppd.models.checkpoint import read_adapter_checkpoint
from ppd.train.data import PrecomputedManifest
from ppd_ray.cli.main import app
from tests.helpers import (
    BASELINE_OVERRIDES,
    baseline_config,
)

HEALTH_METRICS = (
    "loss",
    "implicit_accuracy",
    "model_error_win",
    "model_error_lose",
    "ref_error_win",
    "ref_error_lose",
    "grad_norm",
    "lr",
    "pairs_per_s",
)


def test_a_run_has_its_params_metric_history_artifacts_and_a_model_version(baseline, smoke_config, tracking, tmp_path):
    cache_dir = Path(smoke_config.model.cache_dir).resolve()
    client = MlflowClient(tracking)
    run = client.get_run(baseline["run_id"])
    assert run.info.status == "FINISHED"
    # every config field, as the workers used it (the model cache made absolute for them; the tracking URI of the
    # server that was up when the baseline trained, perhaps another module's, serving the same store)
    expected_params = baseline_config(smoke_config, baseline["tracking_uri"], f"model.cache_dir={cache_dir}").flatten()
    assert run.data.params == expected_params
    assert run.data.params["train.method"] == "ppd" and run.data.params["train.zero_stage"] == "2"

    for key in HEALTH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, 19)), key
    assert {m.value for m in client.get_metric_history(run.info.run_id, "lr")} == {smoke_config.train.lr}
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "pairs_per_s"))

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "sample_grid.png"} <= top
    logged = download_artifacts(
        run_id=run.info.run_id, artifact_path="adapter", dst_path=str(tmp_path / "logged"), tracking_uri=tracking
    )
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "logged" / "adapter" / name).read_bytes() == (
            baseline["out"] / "adapter" / name
        ).read_bytes()
    assert logged.endswith("adapter")

    grid_path = download_artifacts(
        run_id=run.info.run_id, artifact_path="sample_grid.png", dst_path=str(tmp_path), tracking_uri=tracking
    )
    Image.open(grid_path).verify()  # what the grid shows is tested on its rows (tests/unit/test_generate.py)

    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert [v.name for v in versions] == [smoke_config.tracking.registered_model]
    registered = download_artifacts(
        artifact_uri=versions[0].source, dst_path=str(tmp_path / "registered"), tracking_uri=tracking
    )
    meta, _ = read_adapter_checkpoint(registered)
    assert meta.train_method == "ppd" and meta.extra["run_id"] == run.info.run_id and meta.extra["step"] == 18


def _corrupted_copy(precomputed, target):
    """The precomputed set with every pair pointing at a user-embedding row that does not exist."""
    shutil.copytree(precomputed, target)
    manifest = PrecomputedManifest.read(target)
    for path in manifest.split_paths(target, "train"):
        table = pq.read_table(path)
        broken = pa.array([10**6] * table.num_rows, pa.int64())
        pq.write_table(
            table.set_column(table.schema.get_field_index("embedding_index"), "embedding_index", broken), path
        )
    return target


def test_a_crashing_run_ends_failed_and_says_why(inputs, tracking, tmp_path):
    corrupted = _corrupted_copy(inputs.precomputed, tmp_path / "corrupted")
    out = tmp_path / "crash"
    overrides = [*BASELINE_OVERRIDES, "train.method=dpo", "train.max_failures=0", f"tracking.uri={tracking}"]
    arguments = ["train", "--precomputed", str(corrupted), "--out", str(out), "--preset", "smoke"]
    result = CliRunner().invoke(app, [*arguments, *(part for o in overrides for part in ("--set", o))])

    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1  # one line says what went wrong
    assert errors[0].startswith("error: training failed") and "out of range" in errors[0]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    run = MlflowClient(tracking).get_run(run_id)
    assert run.info.status == "FAILED"  # never left RUNNING
    assert "out of range" in run.data.tags["ppd.last_error"]
    assert not (out / "adapter").exists()


def test_runs_compare_prints_runs_side_by_side(baseline, tracking):
    result = CliRunner().invoke(app, ["runs", "compare", "--tracking-uri", tracking, "--preset", "smoke"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"ppd-{baseline['out'].name}" in lines[0]  # one column per run, named after method and run folder
    assert lines[2].split()[0] == "status" and "FINISHED" in lines[2]
    loss_row = next(line for line in lines if line.startswith("loss "))
    assert f"{baseline['final_metrics']['loss']:.4g}" in loss_row
    # the crashed dpo run (if this module ran it) differs in train.method: only differing params are listed
    method_rows = [line for line in lines if line.startswith("train.method")]
    assert all("ppd" in row for row in method_rows)
    assert not any(line.startswith("train.lr ") for line in lines)  # the same in every run: not listed

    missing = CliRunner().invoke(app, ["runs", "compare", "--tracking-uri", tracking, "--experiment", "nope"])
    assert missing.exit_code == 2 and "no experiment named 'nope'" in missing.output
