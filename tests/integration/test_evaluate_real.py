"""The evaluate job on real-data inputs: a Pick-a-Pic-schema preparation and its embeddings, image rewards only.

The toy world is written in the Pick-a-Pic v2 schema; prepared and embedded like real shards, it is a real-data
fixture. Its hidden rewards stay in the world folder, which this job is never given.
"""

import json

import pytest
import torch

from ppd.embed import load_embedder
from ppd.embed.groups import groups_from_rows
from ppd.embed.store import write_part
from ppd.models.checkpoint import save_adapter
from ppd.models.factory import build_personalized_stage_c
from ppd_ray.jobs.evaluate import main, run_real
from ppd_ray.jobs.prepare import run as prepare

SPLITS = ("validation", "test_seen", "test_unseen")


@pytest.fixture(scope="module")
def real_inputs(ray_local, toy_world, smoke_config, tmp_path_factory):
    import pyarrow.parquet as pq

    prepared = tmp_path_factory.mktemp("prepared_real")
    prepare(smoke_config, toy_world / "pairs" / "population", prepared)
    embeddings = tmp_path_factory.mktemp("embeddings_real")
    cache = tmp_path_factory.mktemp("models_real")
    cfg = smoke_config.with_overrides([f"model.cache_dir={cache}"])
    embedder = load_embedder(cfg)  # pairdiff on the tiny CLIP image tower
    groups = groups_from_rows(pq.read_table(sorted((prepared / "groups").glob("*.parquet"))).to_pylist())
    write_part(embedder.embed_groups(groups), embeddings, embedder.identity)
    shape = embedder.embed_groups(groups[:1])[0].embedding.shape
    return cfg, prepared, embeddings, shape


def _adapter(cfg, folder, shape, method, value_scale):
    model = build_personalized_stage_c(cfg.model, shape)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for kv in model.adapter.user_kv.values():
            kv.to_v.weight.copy_(value_scale * torch.randn(kv.to_v.weight.shape, generator=generator))
    return str(save_adapter(model, folder, architecture="tiny", base_model="tiny", train_method=method))


def test_real_data_evaluation_scores_adapters_against_the_base(real_inputs, tmp_path):
    cfg, prepared, embeddings, shape = real_inputs
    cfg = cfg.with_overrides(
        [
            "eval.image_rewards=[pickscore, clip_score, aesthetic, hps]",
            "eval.judge=none",
            "eval.users_per_split=3",
            "eval.captions_per_user=1",
            "eval.seeds_per_caption=1",
            "eval.inference_steps=2",
            "eval.bootstrap_samples=100",
            f"tracking.local_store={tmp_path / 'mlflow'}",
        ]
    )
    adapters = {
        "ppd_zero": _adapter(cfg, tmp_path / "zero", shape, "ppd", 0.0),  # adds nothing: the base exactly
        "ppd_beta2": _adapter(cfg, tmp_path / "beta2", shape, "ppd", 0.5),
        "dpo": _adapter(cfg, tmp_path / "dpo", shape, "dpo", 0.5),
    }
    results = run_real(cfg, prepared, embeddings, tmp_path / "eval", adapters, splits=SPLITS)

    assert results["mode"] == "real" and all(0 < results["users"][s] <= 3 for s in SPLITS)
    assert results["images"] == 4 * sum(results["users"].values())  # base + 3 variants per (user, caption, seed)
    rewards = results["image_rewards"]
    assert set(rewards) == {*SPLITS, "all"}
    for reward in ("pickscore", "clip_score", "aesthetic", "hps"):
        entry = rewards["all"][reward]
        assert set(entry["mean"]) == {"base", *adapters}
        # the zero-init adapter generates the base's images exactly: every paired comparison is a tie
        assert entry["win_rate_vs_base"]["ppd_zero"]["value"] == 0.5
        assert entry["mean"]["ppd_zero"] == pytest.approx(entry["mean"]["base"])
    assert rewards["all"]["pickscore"]["mean"]["ppd_beta2"] != pytest.approx(
        rewards["all"]["pickscore"]["mean"]["base"]
    )
    selection = results["selection"]
    assert selection["reward"] == "pickscore" and selection["best"] in adapters
    assert selection["means"][selection["best"]] == max(selection["means"].values())
    assert "judge" not in results and "judge_generated" not in results  # eval.judge=none
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["image_rewards"] == json.loads(json.dumps(rewards))
    for name in ("samples.png", "win_rates.png", "scores.parquet"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_real_data_mistakes_are_one_line_errors(real_inputs, tmp_path, capsys):
    cfg, prepared, embeddings, _ = real_inputs
    adapters = tmp_path / "adapters.json"
    adapters.write_text(json.dumps({"ppd": str(tmp_path / "missing")}))
    base = ["--preset", "smoke", "--adapters", str(adapters), "--out", str(tmp_path / "out")]
    assert main([*base, "--prepared", str(prepared)]) == 2
    assert "needs --prepared and --embeddings" in capsys.readouterr().err
    assert main([*base, "--prepared", str(prepared), "--embeddings", str(embeddings)]) == 2
    assert "without adapter_config.json" in capsys.readouterr().err
    adapters.write_text(json.dumps({"ppd": _adapter(cfg, tmp_path / "ok", (1, 1), "ppd", 0.0)}))
    assert main([*base, "--prepared", str(prepared), "--embeddings", str(embeddings), "--splits", "train"]) == 2
    assert "unknown split" in capsys.readouterr().err
    inline = ["--preset", "smoke", "--out", str(tmp_path / "out"), "--prepared", str(prepared)]
    assert main([*inline, "--embeddings", str(embeddings), "--adapter", "just-a-folder"]) == 2
    assert "VARIANT=FOLDER" in capsys.readouterr().err
    oracle = [*base, "--prepared", str(prepared), "--embeddings", str(embeddings), "--set", "eval.judge=oracle"]
    assert main(oracle) == 2
    assert "hidden rewards" in capsys.readouterr().err
