"""The β sweep's choice and how the demo uses it: the best validation score per method wins, and only the PPD and
Diffusion-DPO runs of the demo take the chosen β (SFT has none; a choice for another preset is ignored)."""

from __future__ import annotations

import json
import shlex

import pytest

from ppd.config import smoke
from ppd_ray.pipelines.demo import BETA_CHOICE, RESULTS_DIR, demo_jobs, read_beta_choice
from ppd_ray.pipelines.sweep import choose, format_sweep, rechoose, variant_name
from tests.helpers import one_reward_world


def test_the_best_validation_score_wins_and_ties_go_to_the_larger_beta():
    scores = {"ppd": {0.5: 0.1, 2.0: 0.4, 8.0: 0.3}, "dpo": {0.5: 0.2, 2.0: 0.2}}
    assert choose(scores) == {"ppd": 2.0, "dpo": 2.0}
    assert variant_name("ppd", 0.5) == "ppd_beta0.5" and variant_name("dpo", 8.0) == "dpo_beta8"


def test_a_beta_whose_images_stop_drawing_objects_is_not_chosen_however_high_its_reward():
    # The shape of the shipped sweep: the smallest β scores best while its images lose the object.
    scores = {"ppd": {0.0625: 1.74, 0.5: 2.62, 2.0: 2.25}, "dpo": {0.0625: 1.77, 0.25: 1.60, 2.0: 0.51}}
    rates = {"ppd": {0.0625: 0.36, 0.5: 0.77, 2.0: 0.91}, "dpo": {0.0625: 0.41, 0.25: 0.84, 2.0: 0.91}}
    assert choose(scores) == {"ppd": 0.5, "dpo": 0.0625}  # reward alone
    assert choose(scores, rates, base_object_rate=0.875) == {"ppd": 2.0, "dpo": 2.0}
    # a margin admits rates a little below the base's: Diffusion-DPO's 84% at 0.25 (and its better reward)
    assert choose(scores, rates, base_object_rate=0.875, object_rate_margin=0.05) == {"ppd": 2.0, "dpo": 0.25}
    # no β eligible: the one that draws objects most often, not the best-scoring one
    assert choose(scores, rates, base_object_rate=0.99) == {"ppd": 2.0, "dpo": 2.0}
    low = {"ppd": {0.0625: 0.36, 0.5: 0.77, 2.0: 0.60}, "dpo": rates["dpo"]}
    assert choose(scores, low, base_object_rate=0.99)["ppd"] == 0.5


def test_choose_only_reapplies_the_rule_to_the_recorded_validation_scores(tmp_path):
    path = tmp_path / BETA_CHOICE
    record = {
        "scores": {"ppd": {"0.5": 2.62, "2": 2.25}, "dpo": {"0.0625": 1.77, "2": 0.51}},
        "object_rates": {"ppd": {"0.5": 0.77, "2": 0.91}, "dpo": {"0.0625": 0.41, "2": 0.91}},
        "base_object_rate": 0.875,
        "base_mean_reward": 0.36,
        "chosen": {"ppd": 0.5, "dpo": 0.0625},
        "mlflow_parent_run": "f00d",
    }
    path.write_text(json.dumps(record))
    rechosen = rechoose(path, object_rate_margin=0.0)
    assert rechosen["chosen"] == {"ppd": 2.0, "dpo": 2.0}
    on_disk = json.loads(path.read_text())
    assert on_disk["chosen"] == {"ppd": 2.0, "dpo": 2.0} and "object rate" in on_disk["choice_rule"]
    assert on_disk["rechosen"]
    assert on_disk["scores"] == record["scores"] and on_disk["mlflow_parent_run"] == "f00d"  # nothing else changes
    assert "β=2: 2.250 / 91% *" in format_sweep(on_disk) and "β=0.5: 2.620 / 77%" in format_sweep(on_disk)
    del record["object_rates"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="rerun the sweep"):  # a record without object rates cannot be re-chosen
        rechoose(path, 0.0)


def _betas_by_title(jobs) -> dict[str, str | None]:
    found = {}
    for stage in jobs.stages:
        sets = [a.split("=", 1)[1] for a in shlex.split(stage.entrypoint) if a.startswith("train.beta=")]
        found[stage.title] = sets[-1] if sets else None
    return found


def test_the_demo_trains_ppd_and_dpo_with_the_chosen_betas(tmp_path):
    cfg = smoke().with_overrides(["train.upper_bound_rewards=null"])  # all five upper bounds, as the full demo
    out = tmp_path / "out"
    assert read_beta_choice(out, cfg.preset) is None  # no sweep yet: the preset's β
    (out / RESULTS_DIR).mkdir(parents=True)
    record = {"preset": cfg.preset, "chosen": {"ppd": 8.0, "dpo": 0.5}}
    (out / RESULTS_DIR / BETA_CHOICE).write_text(json.dumps(record))
    betas = read_beta_choice(out, cfg.preset)
    assert betas == {"ppd": 8.0, "dpo": 0.5} and read_beta_choice(out, "tiny_cpu") is None  # another preset's

    by_title = _betas_by_title(demo_jobs(cfg, tmp_path / "work", [], 0, one_reward_world(tmp_path), betas))
    assert by_title["train PPD on the one-reward users"] == "8"
    assert by_title["train PPD on the population"] == "8"
    assert by_title["train Diffusion-DPO (no user) on the one-reward users"] == "0.5"
    uppers = [title for title in by_title if title.startswith("train the DPO upper bound")]
    assert len(uppers) == 5 and all(by_title[t] == "0.5" for t in uppers)
    assert by_title["train SFT on preferred images on the one-reward users"] is None
    assert all(by_title[t] is None for t in by_title if not t.startswith("train"))
    default = _betas_by_title(demo_jobs(cfg, tmp_path / "work", [], 0, one_reward_world(tmp_path)))
    assert all(beta is None for beta in default.values())  # without a choice nothing overrides the preset
