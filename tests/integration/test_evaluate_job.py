"""The evaluate job end to end on the smoke toy world, with adapters whose behaviour is known."""

import json
import math

import pytest
import torch

from ppd.config import ATTRIBUTES
from ppd.eval.stats import TIE_TOLERANCE
from ppd.models.checkpoint import save_adapter
from ppd.models.factory import build_personalized_stage_c
from ppd_ray.jobs.evaluate import run
from ppd_ray.jobs.prepare import run as prepare


@pytest.fixture(scope="module")
def one_reward_prepared(ray_local, toy_world, smoke_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_one_reward")
    prepare(smoke_config.with_overrides(["data.test_unseen_user_fraction=0"]), toy_world / "pairs" / "one_reward", out)
    return out


def _adapter(cfg, folder, method, value_scale):
    """A one-hot-user adapter; value_scale 0 keeps the zero init (the adapter adds nothing), else random W'_v."""
    model = build_personalized_stage_c(cfg.model, (1, len(ATTRIBUTES)))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for kv in model.adapter.user_kv.values():
            kv.to_v.weight.copy_(value_scale * torch.randn(kv.to_v.weight.shape, generator=generator))
    return str(save_adapter(model, folder, architecture="tiny", base_model="tiny", train_method=method))


def test_evaluate_scores_every_variant_and_writes_results(
    ray_local, toy_world, one_reward_prepared, smoke_config, tmp_path
):
    store = tmp_path / "mlflow"
    cfg = smoke_config.with_overrides(
        ["eval.captions=2", "eval.seeds_per_caption=2", "eval.inference_steps=3", f"tracking.local_store={store}"]
    )
    adapters = {
        "ppd": _adapter(cfg, tmp_path / "ppd", "ppd", 0.0),  # zero-init adapter == the base model
        "dpo": _adapter(cfg, tmp_path / "dpo", "dpo", 0.5),
        "sft": _adapter(cfg, tmp_path / "sft", "sft", 0.5),
        "dpo_upper_brightness": _adapter(cfg, tmp_path / "upper", "dpo", 0.5),
    }
    results = run(cfg, toy_world, tmp_path / "eval", adapters, one_reward_prepared=one_reward_prepared)
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(on_disk["one_reward"]) == set(ATTRIBUTES)
    for attribute in ATTRIBUTES:
        entry = results["one_reward"][attribute]
        # an adapter that adds nothing generates the base's images, up to a few pixels one grey level apart where its
        # rows are batched differently (CPU kernels): every paired comparison is a tie, the means agree to a tie
        assert entry["win_rate_vs_base"]["value"] == 0.5
        assert entry["mean"]["ppd"] == pytest.approx(entry["mean"]["base"], abs=TIE_TOLERANCE)
        assert entry["win_rate_vs_base"]["n"] == 2 * 2
    brightness = results["one_reward"]["brightness"]["mean"]
    # a user-conditioned adapter with non-zero W'_v changes the images...
    assert brightness["sft"] != pytest.approx(brightness["base"])
    # ...and so does one sampled with the Diffusion-DPO baseline's constant "population" user
    assert brightness["dpo"] != pytest.approx(brightness["base"])
    assert not math.isnan(brightness["dpo_upper"]) and math.isnan(results["one_reward"]["size"]["mean"]["dpo_upper"])
    assert set(results["interpolation"]) == set(ATTRIBUTES)
    # the base's quality gate, measured on the base images of this evaluation: a random tiny base draws no toy world
    gate = results["base_quality"]
    assert gate["samples"] == 2 * 2 and not gate["passed"] and set(gate["ks"]) == set(ATTRIBUTES)
    assert results["objects"]["toy_world"]["object_rate"] >= 0.95  # the measure sees the renders' objects
    for name in ("samples.png", "win_rates.png", "interpolation.png", "scores.parquet"):
        assert (tmp_path / "eval" / name).stat().st_size > 0

    # the evaluation is an MLflow run with the numbers of results.json as metrics and the plots as artifacts
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (run_info,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run_info.info.status == "FINISHED"
    metrics = run_info.data.metrics
    assert metrics["one_reward.brightness.mean.sft"] == pytest.approx(brightness["sft"])
    assert metrics["one_reward.size.win_rate_vs_base.value"] == 0.5
    # artifacts went through the (now stopped) server into its artifact root, under this run's id
    logged = list(store.glob(f"artifacts/**/{run_info.info.run_id}/**/evaluation/results.json"))
    assert len(logged) == 1 and json.loads(logged[0].read_text())["one_reward"] == on_disk["one_reward"]


def test_validate_scores_adapters_on_validation_captions_only(
    ray_local, toy_world, one_reward_prepared, smoke_config, tmp_path
):
    from ppd.eval.evaluate import read_split
    from ppd_ray.jobs.validate import run as validate

    cfg = smoke_config.with_overrides(["eval.captions=2", "eval.seeds_per_caption=1", "eval.inference_steps=3"])
    adapters = {
        "ppd_beta1": _adapter(cfg, tmp_path / "zero", "ppd", 0.0),  # adds nothing: scores exactly as the base
        "ppd_beta4": _adapter(cfg, tmp_path / "random", "ppd", 0.5),
    }
    results = validate(cfg, toy_world, one_reward_prepared, adapters, tmp_path / "validation")
    assert json.loads((tmp_path / "validation" / "validation.json").read_text()) == results
    assert results["ppd_beta1"]["mean_reward"] == pytest.approx(results["ppd_beta1"]["base_mean_reward"])
    assert results["ppd_beta1"]["win_rate_vs_base"]["value"] == 0.5  # ties only
    assert results["ppd_beta4"]["mean_reward"] != pytest.approx(results["ppd_beta4"]["base_mean_reward"])
    # the zero adapter draws the base's images, so it draws an object exactly as often
    assert results["ppd_beta1"]["object_rate"] == results["ppd_beta1"]["base_object_rate"]
    assert all(0.0 <= entry["object_rate"] <= 1.0 for entry in results.values())
    # 5 one-reward users x 2 validation captions x 1 seed, and never a test caption
    assert results["ppd_beta4"]["win_rate_vs_base"]["n"] == len(ATTRIBUTES) * 2
    validation = set(read_split(one_reward_prepared, "validation", ["caption"])["caption"])
    test = set(read_split(one_reward_prepared, "test_seen", ["caption"])["caption"])
    assert validation and not validation & test


def test_generation_draws_a_repeated_request_once_and_gives_every_request_its_image(
    ray_local, smoke_config, tmp_path, capsys
):
    from ppd_ray.jobs.common import generate_images

    cfg = smoke_config.with_overrides(["eval.inference_steps=2"])
    adapters = {"sft": _adapter(cfg, tmp_path / "sft", "sft", 0.5)}
    user = [1.0, 0.0, 0.0, 0.0, 0.0]

    def request(request_id, variant, seed, embedding=None):
        shape = None if embedding is None else [1, len(ATTRIBUTES)]
        return dict(
            request_id=request_id,
            variant=variant,
            caption="a picture of a teal ring",
            seed=seed,
            embedding=embedding,
            embedding_shape=shape,
            user_id=request_id,
        )

    requests = [
        request(0, "base", 1),
        request(1, "base", 2),
        request(2, "base", 1),  # 0's image, asked for another user
        request(3, "sft", 1, user),
        request(4, "sft", 1, user),  # 3's image
        request(5, "sft", 1, [0.0, 1.0, 0.0, 0.0, 0.0]),
    ]
    frame = generate_images(cfg, requests, adapters)
    assert "6 images requested, 4 distinct: each drawn once" in capsys.readouterr().err  # the job's progress line
    assert frame["request_id"].tolist() == list(range(6)) and frame["user_id"].tolist() == list(range(6))
    png = frame["png"].tolist()
    assert png[2] == png[0] and png[4] == png[3]
    assert len({png[0], png[1], png[3], png[5]}) == 4  # another seed, model or user: another image
    reward_columns = [c for c in frame.columns if c.startswith("image_reward.")]
    assert frame.loc[2, reward_columns].tolist() == frame.loc[0, reward_columns].tolist()
