"""`ppd demo --preset smoke`: the whole chain as Ray jobs on a local head, through the installed `ppd` command (the
README's demo command at the smoke size; CI runs it only here), ending in a results file where PPD has learnt the
brightness user's taste."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppd.config import ATTRIBUTES
from tests.helpers import processes_mentioning

REPO = Path(__file__).resolve().parents[2]


def _estimate_ok(est: dict) -> bool:
    low, high = est["ci95"]
    return 0.0 <= low <= est["value"] <= high <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the demo's own limit (1800 s) and the checks after it
def test_smoke_demo_runs_every_stage_and_writes_results(tmp_path):
    out, workdir = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}  # the demo must start (and stop) its own server
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "ppd"),  # the console script `make setup` installs
            "demo",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((out / "results" / "seed0.json").read_text())
    assert results["preset"] == "smoke" and results["seed"] == 0 and results["runtime_s"] > 0
    for attribute in ATTRIBUTES:
        entry = results["one_reward"][attribute]
        assert _estimate_ok(entry["win_rate_vs_base"])
        assert set(entry["mean"]) >= {"base", "dpo", "sft", "ppd", "dpo_upper"}
        assert all(math.isfinite(entry["mean"][k]) for k in ("base", "dpo", "sft", "ppd"))
        # the smoke preset trains one upper bound (brightness's); the other rewards have none, and say so
        assert math.isfinite(entry["mean"]["dpo_upper"]) == (attribute == "brightness"), (attribute, entry["mean"])
        assert -1.0 <= results["interpolation"][attribute]["spearman"] <= 1.0
    # Learning, not only plumbing: even the smoke run's few steps move PPD's images toward the brightness user's
    # taste (an adapter that learnt nothing draws exactly the base's images: zero-initialised value projection).
    brightness = results["one_reward"]["brightness"]
    assert brightness["mean"]["ppd"] > brightness["mean"]["base"], brightness["mean"]
    assert brightness["win_rate_vs_base"]["n"] >= 4 and brightness["win_rate_vs_base"]["value"] >= 0.75, brightness
    for split in ("test_seen", "test_unseen"):
        assert _estimate_ok(results["population"][split]["win_rate_vs_base"])
    assert 0.0 < results["classifier"]["chance16"] <= 1.0 and 0.0 <= results["classifier"]["top16"] <= 1.0

    # What a person sees while it runs: each training run's progress (printed by its Ray Train worker), not Ray's
    # per-upload chatter.
    assert re.search(r"\| \[ppd +[\d.]+s\] step 80/80 loss", completed.stdout), completed.stdout[-3000:]
    assert "Ignoring upload to cluster" not in completed.stdout + completed.stderr

    markdown = (out / "RESULTS.md").read_text()
    assert "Do not edit by hand" in markdown and "ppd demo --preset smoke" in markdown
    assert "| seed 0 |" in markdown.replace("| target | goal | seed 0 |", "| seed 0 |")  # the targets table
    assert "| 0 | size |" in markdown and " | — | " in markdown  # size's row: no upper bound trained, a dash
    assert "DPO upper bound beats the base: brightness" in markdown
    assert "DPO upper bound beats the base: size" not in markdown
    for link in results["figures"].values():  # the Markdown's image links resolve next to it
        assert (out / link).is_file() and f"]({link})" in markdown
    # every training run (PPD, DPO, SFT, population, one upper bound) and the evaluation reached the demo's MLflow
    # store and ended FINISHED
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ppd")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 + 1 + 1
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the demo stopped what it started: no process of its Ray head (GCS, raylet, dashboard, workers: all name the
    # head's address or its temp dir) nor of its MLflow server is left, and the head's temp dir is gone
    head = re.search(r"Ray head at (\S+), dashboard \S+, temp dir (\S+)", completed.stderr)
    assert head, completed.stderr[-3000:]
    gcs_address, ray_temp_dir = head.groups()
    for marker in (gcs_address, ray_temp_dir, str(workdir / "mlflow")):
        assert processes_mentioning(marker) == [], marker
    assert not Path(ray_temp_dir).exists()
