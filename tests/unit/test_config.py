import json

import pytest
import yaml

from ppd.config import PRESETS, ConfigError, PPDConfig, load_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = PRESETS[name]()
    assert cfg.preset == name
    assert PPDConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert PPDConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # workers x micro-batch x accumulation must give back the effective batch exactly
    t = cfg.train
    assert t.num_workers * t.micro_batch * t.grad_accumulation == t.effective_batch


def test_paper_preset_matches_paper_setting():
    t = load_config("stage_c_lite_h100x8").train
    # the paper: 768 pairs per optimiser step in bf16; the preset's name: 8 GPUs, one training worker each
    assert t.effective_batch == 768 and t.precision == "bf16" and t.use_gpu
    assert t.num_workers == 8


def test_file_round_trip(tmp_path):
    cfg = load_config("tiny_cpu", ["train.lr=3e-4"])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(config_file=path).train.lr == 3e-4


def test_overrides_are_typed_and_validated():
    cfg = load_config("tiny_cpu", ["train.lr=3e-4", "embed.layers=[0, 2]", "data.seed=7"])
    assert cfg.train.lr == 3e-4 and cfg.embed.layers == [0, 2] and cfg.data.seed == 7
    with pytest.raises(ConfigError, match="unknown field 'lrr'"):
        load_config("tiny_cpu", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="no config section"):
        load_config("tiny_cpu", ["trian.lr=1"])
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config("tiny_cpu", ["train.micro_batch=7"])
    with pytest.raises(ConfigError, match="greater than 0"):
        load_config("tiny_cpu", ["train.lr=-1"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")


def test_flatten_gives_dotted_string_params():
    cfg = load_config("tiny_cpu", ["train.lr=0.00025"])
    flat = cfg.flatten()
    assert flat["train.lr"] == "0.00025"  # an override's value, as MLflow will show it
    assert flat["data.toy.image_size"] == str(load_config("tiny_cpu").data.toy.image_size)
    assert flat["train.users"] == "None" and flat["eval.image_rewards"].startswith("[")  # None and lists as text
    assert all(isinstance(v, str) for v in flat.values())


def test_results_flatten_to_numeric_metrics_with_list_items_indexed():
    from ppd_ray.jobs.evaluate import flatten_numbers

    results = {"brightness": {"win_rate": {"value": 0.75, "ci95": [0.5, 1.0], "n": 32}}, "ok": True, "preset": "x"}
    assert flatten_numbers(results) == [
        ("brightness.win_rate.value", 0.75),
        ("brightness.win_rate.ci95.0", 0.5),
        ("brightness.win_rate.ci95.1", 1.0),
        ("brightness.win_rate.n", 32.0),
    ]  # booleans and text are no metrics
