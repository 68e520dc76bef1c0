"""RESULTS.md's time goal and β section: what the demo reports about its own run time and the β it trained with."""

from __future__ import annotations

from ppd.eval.report import render_results_markdown, target_checks


def _runtime_check(results: dict):
    return next((c for c in target_checks(results) if c.name == "demo runtime"), None)


def test_the_default_preset_is_held_to_30_minutes_and_a_resumed_run_says_so():
    assert _runtime_check({"preset": "tiny_cpu", "runtime_s": 1790}).met
    over = _runtime_check({"preset": "tiny_cpu", "runtime_s": 1830, "resumed": True})
    assert not over.met and over.value.startswith("30.5 min") and "resumed" in over.value
    # The smoke and cluster presets have no time goal of their own.
    assert _runtime_check({"preset": "smoke", "runtime_s": 99999}) is None


SWEEP = {
    "preset": "tiny_cpu",
    "seed": 0,
    "split": "validation",
    "betas": [0.5, 2.0, 8.0],
    "steps": 400,
    "scores": {"ppd": {"0.5": 0.91, "2": 1.37, "8": 0.42}, "dpo": {"0.5": 0.33, "2": 0.29, "8": 0.11}},
    "base_mean_reward": 0.05,
    "chosen": {"ppd": 2.0, "dpo": 0.5},
    "mlflow_parent_run": "f00d",
    "seconds": 1700.0,
}


def test_results_name_each_runs_beta_and_the_sweep_that_chose_it():
    runs = [
        {
            "seed": 0,
            "preset": "tiny_cpu",
            "runtime_s": 1700,
            "beta": {"ppd": 2.0, "dpo": 0.5},
            "beta_source": "sweep",
            "machine": {"cpu": "AMD EPYC", "logical_cpus": 2, "vector_unit": "AVX2", "gflops_one_core": 41.26},
        },
        {"seed": 1, "preset": "tiny_cpu", "runtime_s": 1750, "beta": {"ppd": 2.0, "dpo": 2.0}, "beta_source": "preset"},
    ]
    text = render_results_markdown(runs, "ppd demo", beta_sweep=SWEEP)
    # the box each runtime was measured on (runs from before it was recorded: –)
    assert "| 0 | tiny_cpu | 1700 s | AMD EPYC, 2 CPUs, AVX2, 41 GFLOP/s per core | 2 / 0.5 | sweep |" in text
    assert "| 1 | tiny_cpu | 1750 s | – | 2 / 2 | preset |" in text
    # the validation scores, the chosen β per method in bold (PPD's best is β = 2, Diffusion-DPO's β = 0.5)
    assert "| PPD | 0.910 | **1.370** | 0.420 |" in text
    assert "| Diffusion-DPO | **0.330** | 0.290 | 0.110 |" in text
    assert "f00d" in text
    assert "β chosen on the validation split" not in render_results_markdown(runs, "ppd demo")
    # runs kept from an earlier invocation are named: the minutes are this invocation's only
    assert "trained by an earlier invocation" not in text
    kept = render_results_markdown(runs, "ppd demo", beta_sweep={**SWEEP, "kept_runs": ["ppd_beta2", "dpo_beta8"]})
    assert "28 min; ppd_beta2, dpo_beta8 trained by an earlier invocation on the same workdir, not timed" in kept
    every = [f"{m}_beta{b:g}" for m in ("ppd", "dpo") for b in SWEEP["betas"]]
    all_kept = render_results_markdown(runs, "ppd demo", beta_sweep={**SWEEP, "kept_runs": every})
    assert (
        "28 min; all 6 runs trained by earlier invocations on the same workdir, so these minutes are the scoring"
        in all_kept
    )
    # the share of validation images with an object, per method and β, beside the scores (not part of the choice)
    assert "object drawn" not in text
    rates = {"ppd": {"0.5": 0.82, "2": 0.9, "8": 0.95}, "dpo": {"0.5": 0.22, "2": 0.88, "8": 0.97}}
    shown = render_results_markdown(
        runs, "ppd demo", beta_sweep={**SWEEP, "object_rates": rates, "base_object_rate": 0.96}
    )
    assert (
        "| PPD: object drawn | 82% | 90% | 95% |" in shown
        and "| Diffusion-DPO: object drawn | 22% | 88% | 97% |" in shown
    )
    assert "base 96%" in shown and "Not part of the choice" in shown
    # a sweep chosen under the object-rate rule says so, above the table and under it
    ruled = render_results_markdown(
        runs,
        "ppd demo",
        beta_sweep={**SWEEP, "object_rates": rates, "base_object_rate": 0.96, "choice_rule": "RULE-TEXT"},
    )
    assert "Chosen per method (bold): RULE-TEXT;" in ruled and "is not chosen, however high its reward" in ruled
    # no PPD β reaches the base's 96% (95% at best): the rule took its highest object rate, and the text says which;
    # Diffusion-DPO's 97% at β = 8 reaches it
    fallback = {**SWEEP, "object_rates": rates, "base_object_rate": 0.96, "choice_rule": "RULE-TEXT"}
    fallback["chosen"] = {"ppd": 8.0, "dpo": 8.0}
    took_highest = render_results_markdown(runs, "ppd demo", beta_sweep=fallback)
    assert "No β of PPD reached 96%, so the one drawing objects most often was taken (β = 8)." in took_highest
    assert "No β of Diffusion-DPO" not in took_highest
    # a 2-point margin lets PPD's 95% in: no fallback to report
    margin = render_results_markdown(runs, "ppd demo", beta_sweep={**fallback, "object_rate_margin": 0.02})
    assert "No β of" not in margin
    rechosen = render_results_markdown(
        runs, "ppd demo", beta_sweep={**SWEEP, "choice_rule": "RULE-TEXT", "rechosen": True}
    )
    assert "RULE-TEXT (applied afterwards to these recorded scores by `ppd sweep beta --choose-only`);" in rechosen


def test_one_swap_in_five_interpolation_weights_meets_the_spearman_target():
    from ppd.eval.stats import spearman

    weights = [0.0, 0.25, 0.5, 0.75, 1.0]
    rho = spearman(weights, [-1.18, 0.31, 2.14, 2.40, 2.38])  # the last two means swapped: ρ = 1 − 6·2/120 = 0.9
    two_swaps = spearman(weights, [0.31, -1.18, 2.14, 2.40, 2.38])  # ρ = 1 − 6·4/120 = 0.8

    def check(value):
        results = {"interpolation": {"brightness": {"spearman": value}}}
        return next(c for c in target_checks(results) if c.name == "interpolation Spearman: brightness")

    assert check(rho).met and check(rho).value == "0.90"
    assert not check(two_swaps).met


def test_the_sample_grid_shows_each_rows_own_image_when_experiments_interleave(tmp_path):
    """The evaluation's rows come back in request order, one-reward rows mixed with population and interpolation
    rows; the grid must draw the image generated for each cell's (variant, user, caption, seed)."""
    import numpy as np
    import pandas as pd

    from ppd.eval.report import sample_grid, sample_grid_cells

    captions = ["a red disc", "a blue ring"]
    rows = []
    for caption in captions:
        for variant, user in (("base", 100), ("ppd", 100), ("ppd", 101)):
            rows.append({"experiment": "population", "variant": variant, "user_id": 7, "caption": caption, "seed": 0})
            rows.append(
                {"experiment": "one_reward", "variant": variant, "user_id": user, "caption": caption, "seed": 0}
            )
    scored = pd.DataFrame(rows)
    images = np.stack([np.full((4, 4, 3), position, dtype=np.uint8) for position in range(len(scored))])
    cells, labels, columns = sample_grid_cells(scored, images)
    assert labels == ["base", "ppd: brightness", "ppd: saturation"] and columns == captions
    for label, row in zip(labels, cells, strict=True):
        variant, user = ("base", 100) if label == "base" else ("ppd", 100 if label.endswith("brightness") else 101)
        for caption, image in zip(captions, row, strict=True):
            (position,) = scored.index[
                (scored.experiment == "one_reward")
                & (scored.variant == variant)
                & (scored.user_id == user)
                & (scored.caption == caption)
            ]
            assert image is not None and (image == position).all(), (label, caption)
    assert sample_grid(scored, images, tmp_path / "samples.png").is_file()
