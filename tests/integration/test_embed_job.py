"""The Ray Data embedding job: resumable, error rows instead of crashes, both CLIs, and the classifier command."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ppd.embed.groups import groups_from_pairs
from ppd.embed.store import read_embeddings, read_rows
from ppd_ray.cli.main import app
from ppd_ray.jobs.embed import main, run, with_embed_args

N_GROUPS = 24


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toy_world):
    """A prepared folder with groups/ as `ppd prepare` writes it; group 5 has one undecodable image."""
    folder = tmp_path_factory.mktemp("prepared")
    pairs = pq.read_table(toy_world / "pairs" / "population").to_pandas()
    rows = groups_from_pairs(pairs, shots=4, seed=0)[:N_GROUPS]
    for row in rows:
        row["pool"] = "seen"
    rows[5]["jpg_1"] = [rows[5]["jpg_1"][0], b"\x89PNG broken", *rows[5]["jpg_1"][2:]]
    (folder / "groups").mkdir()
    half = N_GROUPS // 2  # two files, as the preparation job writes several
    pq.write_table(pa.Table.from_pylist(rows[:half]), folder / "groups" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), folder / "groups" / "b.parquet")
    return folder


@pytest.fixture(scope="module")
def cfg(smoke_config, tmp_path_factory):
    return smoke_config.with_overrides(
        [f"model.cache_dir={tmp_path_factory.mktemp('models')}", "embed.batch_size=4", "embed.max_new_tokens=6"]
    )


def test_interrupted_job_resumes_without_duplicates_or_gaps(ray_local, prepared, cfg, tmp_path):
    pairdiff = with_embed_args(cfg, embedder="pairdiff")
    first = run(pairdiff, prepared, tmp_path, limit=10)  # stands for a job killed after 10 groups
    assert (first["embedded"] + first["failed"], first["already_done"]) == (10, 0)

    second = run(pairdiff, prepared, tmp_path)
    assert second["already_done"] == 10 and second["embedded"] + second["failed"] == N_GROUPS - 10

    table = read_rows(tmp_path)
    group_ids = table.column("group_id").to_pylist()
    assert sorted(group_ids) == list(range(N_GROUPS))  # every group exactly once
    assert first["failed"] + second["failed"] == 1
    failed = table.filter(pa.compute.is_valid(table["error"])).to_pylist()
    assert [row["group_id"] for row in failed] == [5] and "pair 2: undecodable image" in failed[0]["error"]

    embeddings = read_embeddings(tmp_path)
    assert len(embeddings) == N_GROUPS - 1 and {e.shape for e in embeddings.values()} == {(4, 64)}

    third = run(pairdiff, prepared, tmp_path)  # nothing left: no Ray work, no new parts
    assert third["embedded"] == 0 and third["already_done"] == N_GROUPS
    assert read_rows(tmp_path).num_rows == N_GROUPS


@pytest.mark.slow
def test_vlm_job_writes_profiles_and_layer_embeddings(ray_local, prepared, cfg, tmp_path, capsys):
    vlm = with_embed_args(cfg, embedder="vlm-hf", layers="0,-1")
    summary = run(vlm, prepared, tmp_path, limit=4)
    assert summary["embedded"] == 4 and summary["layers"] == [0, 2]
    rows = read_rows(tmp_path).to_pylist()
    assert all(row["embedding_shape"] == [2, 128] and row["profile"] for row in rows)
    assert {row["model_id"] for row in rows} == {"tiny-llava-onevision"}
    assert len(rows[0]["embedding"]) == 2 * 128 and isinstance(rows[0]["embedding"][0], float)
    assert len(list(tmp_path.glob("summary-*.json"))) == 1
    assert "embedded 4/4 groups" in capsys.readouterr().err  # progress lines


def test_job_and_cli_mistakes_are_one_line_errors(prepared, cfg, tmp_path, capsys):
    assert main(["--prepared", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--prepared", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no few-shot groups" in capsys.readouterr().err
    runner = CliRunner()
    for args, message in [
        (["--layers", "1,x"], "--layers must be"),
        (["--embedder", "clip"], "--embedder must be one of"),
        (["--embedder", "vlm-hf", "--layers", "7"], "out of range"),
        (["--embedder", "vlm-hf", "--model", str(tmp_path / "no-model")], "cannot read the model config"),
    ]:
        cache = ["--preset", "smoke", "--set", f"model.cache_dir={cfg.model.cache_dir}"]
        result = runner.invoke(app, ["embed", "--prepared", str(prepared), "--out", str(tmp_path / "o"), *cache, *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        # (library warnings such as DeepSpeed's accelerator notice may precede it)
        assert [line for line in result.output.splitlines() if message in line][0].startswith("error: ")


def test_classify_command_writes_report_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    from ppd.embed.base import EmbeddingIdentity, EmbeddingRow
    from ppd.embed.store import write_part

    identity = EmbeddingIdentity("pairdiff", "tiny", "h", (), {})
    centres = rng.standard_normal((6, 16))  # 6 well-separated users, 5 groups each
    rows = [
        EmbeddingRow(
            user_id=u,
            group_id=5 * u + i,
            pair_ids=[],
            model_id="tiny",
            prompt_hash="h",
            settings=identity.settings_json,
            embedding=(centres[u] + 0.1 * rng.standard_normal((4, 16))).astype(np.float32),
        )
        for u in range(6)
        for i in range(5)
    ]
    write_part(rows, tmp_path / "emb", identity)
    result = CliRunner().invoke(
        app, ["embed", "classify", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "cls")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cls" / "classifier.json").read_text())
    assert report["n_users"] == 6 and report["pooling"] == "mean" and report["top_k"]["1"] == 1.0
    assert report["chance"]["1"] == pytest.approx(1 / 6)
    assert (tmp_path / "cls" / "top_k.png").stat().st_size > 1000
