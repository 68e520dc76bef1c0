"""Plots and the RESULTS.md report of a toy-world evaluation (written by the command, never by hand)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ppd.config import ATTRIBUTES

# Targets of the toy-world replication (issues 6 and 13), beside the paper's numbers.
TARGETS = {
    "one_reward_win_rate": 0.85,  # paper: 60 / 90 / 93 % (CLIP / Aesthetic / HPS)
    "interpolation_spearman": 0.9,
    "population_test_seen": 0.80,  # paper: 83 %
    "population_test_unseen": 0.75,  # paper: 78 %
    "classifier_over_chance": 3.0,  # top-16 accuracy at least this many times chance
}
# `make demo` on an idle 2-core box, from toy world to RESULTS.md (issue 13); other presets have no time goal.
DEMO_MINUTES = {"tiny_cpu": 30.0}


@dataclass(frozen=True)
class TargetCheck:
    """One target of the toy-world proof, measured in one run."""

    name: str
    value: str
    target: str
    met: bool


def target_checks(results: dict) -> list[TargetCheck]:
    """Every target of one run's results, in a fixed order (the terminal summary and RESULTS.md both print these)."""
    checks: list[TargetCheck] = []
    minutes = DEMO_MINUTES.get(results.get("preset"))
    if minutes is not None and "runtime_s" in results:
        runtime = results["runtime_s"] / 60
        resumed = " (resumed: the kept stages' times added)" if results.get("resumed") else ""
        checks.append(
            TargetCheck("demo runtime", f"{runtime:.1f} min{resumed}", f"≤ {minutes:.0f} min", runtime <= minutes)
        )
    gate = results.get("base_quality")
    if gate:
        missed = [name for name in ("object_present", "colour_match", "shape_match") if not gate[name]["met"]]
        missed += [f"KS {a}" for a, entry in gate["ks"].items() if not entry["met"]]
        value = "passed" if gate["passed"] else "missed: " + ", ".join(missed)
        checks.append(TargetCheck("toy base quality gate", value, "every measure met", gate["passed"]))
    for attribute, entry in results.get("one_reward", {}).items():
        est, mean = entry["win_rate_vs_base"], entry["mean"]
        win_target = TARGETS["one_reward_win_rate"]
        checks.append(
            TargetCheck(
                f"PPD win rate vs base: {attribute}", _ci(est), f"≥ {_pct(win_target)}", est["value"] >= win_target
            )
        )
        checks.append(
            TargetCheck(
                f"PPD mean ≥ Diffusion-DPO mean: {attribute}",
                f"{mean['ppd']:.2f} vs {mean['dpo']:.2f}",
                "PPD ≥ DPO",
                mean["ppd"] >= mean["dpo"],
            )
        )
        if math.isfinite(mean.get("dpo_upper", math.nan)):  # NaN: the run trained no upper bound for this reward
            checks.append(
                TargetCheck(
                    f"DPO upper bound beats the base: {attribute}",
                    f"{mean['dpo_upper']:.2f} vs {mean['base']:.2f}",
                    "upper > base",
                    mean["dpo_upper"] > mean["base"],
                )
            )
    for attribute, sweep in results.get("interpolation", {}).items():
        target = TARGETS["interpolation_spearman"]
        rho = sweep["spearman"]
        checks.append(
            # Over 5 weights ρ takes the values 1 − 6Σd²/120: one adjacent swap is exactly 0.9, which scipy's float
            # arithmetic returns as 0.8999999999999998.
            TargetCheck(f"interpolation Spearman: {attribute}", f"{rho:.2f}", f"≥ {target}", bool(rho >= target - 1e-9))
        )
    for split, entry in results.get("population", {}).items():
        target = TARGETS.get(f"population_{split}")
        if target is not None:
            est = entry["win_rate_vs_base"]
            checks.append(
                TargetCheck(
                    f"population {split} win rate vs base", _ci(est), f"≥ {_pct(target)}", est["value"] >= target
                )
            )
    classifier = results.get("classifier")
    if classifier:
        ratio = TARGETS["classifier_over_chance"]
        top, chance = classifier["top16"], classifier["chance16"]
        checks.append(
            TargetCheck(
                "user classifier top-16 vs chance",
                f"{_pct(top)} vs {_pct(chance)}",
                f"≥ {ratio:.0f}× chance",
                top >= ratio * chance,
            )
        )
    return checks


def _betas(results: dict) -> str:
    beta = results.get("beta") or {}
    return f"{beta['ppd']:g} / {beta['dpo']:g}" if "ppd" in beta and "dpo" in beta else "–"


def _beta_sweep_lines(record: dict | None) -> list[str]:
    """The β sweep of `ppd sweep beta`: validation score per method and β (never a test split), the choice in bold."""
    if not record:
        return []
    betas = [f"{float(b):g}" for b in record["betas"]]
    names = {"ppd": "PPD", "dpo": "Diffusion-DPO"}
    kept_runs = record.get("kept_runs") or []
    runs = len(record["scores"]) * len(betas)
    if kept_runs and len(kept_runs) == runs:
        kept = f"; all {runs} runs trained by earlier invocations on the same workdir, so these minutes are the scoring"
    elif kept_runs:
        kept = f"; {', '.join(kept_runs)} trained by an earlier invocation on the same workdir, not timed"
    else:
        kept = ""
    lines = [
        "## β chosen on the validation split (paper B.1)",
        "",
        f"`ppd sweep beta` ({record['preset']}, seed {record['seed']}, {record['steps']} steps per run, MLflow parent "
        f"run `{record.get('mlflow_parent_run', '–')}`, {record.get('seconds', float('nan')) / 60:.0f} min{kept}): mean "
        f"hidden reward of the one-reward users on validation captions (base {record['base_mean_reward']:.3f}). "
        f"Chosen per method (bold): {record.get('choice_rule', 'the highest validation mean reward')}"
        + (
            " (applied afterwards to these recorded scores by `ppd sweep beta --choose-only`)"
            if record.get("rechosen")
            else ""
        )
        + "; `ppd demo` then trains with it on every seed (the table above says which β each run used).",
        "",
        "| method | " + " | ".join(f"β = {b}" for b in betas) + " |",
        "| --- |" + " --- |" * len(betas),
    ]
    for method, by_beta in record["scores"].items():
        chosen = float(record["chosen"][method])
        cells = []
        for b in betas:
            value = by_beta.get(b)
            text = "–" if value is None else f"{value:.3f}"
            cells.append(f"**{text}**" if float(b) == chosen and value is not None else text)
        lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
    object_rates = record.get("object_rates") or {}
    for method, by_beta in object_rates.items():
        cells = ["–" if by_beta.get(b) is None else _pct(by_beta[b]) for b in betas]
        lines.append(f"| {names.get(method, method)}: object drawn | " + " | ".join(cells) + " |")
    if object_rates:
        lines += [
            "",
            f"Object drawn: share of the validation images with an object (the quality gate's measure; base "
            f"{_pct(record['base_object_rate'])}). "
            + (
                "A β whose rate falls below the base's is not chosen, however high its reward: there the pixel "
                "rewards may be won by painting the image instead of drawing the toy world."
                if "choice_rule" in record
                else "Not part of the choice: a row where it falls while the reward rises is the pixel rewards being "
                "won without drawing the toy world."
            ),
        ]
        if "choice_rule" in record:
            lines[-1] += "".join(_fallback_sentence(record, method, names) for method in object_rates)
    return [*lines, ""]


def _fallback_sentence(record: dict, method: str, names: dict[str, str]) -> str:
    """The sweep's rule takes the β drawing objects most often where none reaches the base's rate (less the margin);
    RESULTS.md must say so, or its bold cell reads as the best eligible reward."""
    from ppd.eval.base_quality import draws_as_often_as_base  # scipy and the toy world: only where a sweep is shown

    base, margin = record["base_object_rate"], record.get("object_rate_margin") or 0.0
    if any(draws_as_often_as_base(rate, base, margin) for rate in record["object_rates"][method].values()):
        return ""
    return (
        f" No β of {names.get(method, method)} reached {_pct(base - margin)}, so the one drawing objects most often "
        f"was taken (β = {float(record['chosen'][method]):g})."
    )


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    path: Path,
    cell_inches: float = 1.3,
) -> Path:
    """uint8 images [H, W, 3] in a labelled grid saved to `path`: a label left of each row, one above each column;
    None leaves a cell empty. Every sample grid (evaluation, real data, a training run's MLflow grid) is drawn here."""
    plt = _matplotlib()
    columns = max(1, len(column_labels))
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(cell_inches * columns + 1.2, cell_inches * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(row) and row[c] is not None:
                axis.imshow(row[c])  # small images are upsampled nearest-neighbour, large ones antialiased
            if r == 0:
                axis.set_title(column_labels[c], fontsize=6)
            if c == 0:
                axis.set_ylabel(row_labels[r], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(scored: pd.DataFrame, images: np.ndarray, path: Path, columns: int = 6) -> Path | None:
    """Rows: the base, then PPD for each one-reward user; columns: captions (seed of the first request)."""
    grid = sample_grid_cells(scored, images, columns)
    return None if grid is None else image_grid(*grid, path)


def sample_grid_cells(
    scored: pd.DataFrame, images: np.ndarray, columns: int = 6
) -> tuple[list[list[np.ndarray | None]], list[str], list[str]] | None:
    """The sample grid's images, row labels and column captions; row i of `scored` is `images[i]`."""
    # Positions, not labels: the one-reward rows are scattered through the evaluation's rows, and an index reset
    # after the filter (as this code once did) picked other experiments' images for the grid.
    rows = scored.reset_index(drop=True)
    rows = rows[rows.experiment == "one_reward"]
    if rows.empty:
        return None
    first_seed = rows.seed.min()
    captions = list(dict.fromkeys(rows[rows.seed == first_seed].caption))[:columns]
    lines = [("base", rows[(rows.variant == "base")])]
    lines += [
        (f"ppd: {a}", rows[(rows.variant == "ppd") & (rows.user_id == u)])
        for a, u in zip(ATTRIBUTES, sorted(rows[rows.variant == "ppd"].user_id.unique()), strict=False)
    ]
    cells = []
    for _, frame in lines:
        matches = [frame[(frame.caption == caption) & (frame.seed == first_seed)] for caption in captions]
        cells.append([images[match.index[0]] if len(match) else None for match in matches])
    short_captions = [c.replace("a picture of ", "").replace("an image showing ", "") for c in captions]
    return cells, [label for label, _ in lines], short_captions


def win_rate_bars(results: dict, path: Path) -> Path:
    """PPD's win rate vs the base per reward and per population split, with 95% CIs."""
    labels, values, low, high = [], [], [], []
    for attribute, entry in results.get("one_reward", {}).items():
        est = entry["win_rate_vs_base"]
        labels.append(attribute)
        values.append(est["value"])
        low.append(est["value"] - est["ci95"][0])
        high.append(est["ci95"][1] - est["value"])
    for split, entry in results.get("population", {}).items():
        est = entry["win_rate_vs_base"]
        labels.append(f"population\n{split}")
        values.append(est["value"])
        low.append(est["value"] - est["ci95"][0])
        high.append(est["ci95"][1] - est["value"])
    plt = _matplotlib()
    fig, axis = plt.subplots(figsize=(1 + 1.1 * len(labels), 3.2))
    axis.bar(range(len(labels)), values, yerr=[low, high], capsize=3, color="#4c72b0")
    axis.axhline(0.5, color="grey", lw=0.8, ls="--")
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_ylabel("PPD win rate vs base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interpolation_plot(results: dict, path: Path) -> Path | None:
    """Mean reward k against the weight on user k, one line per reward."""
    sweeps = results.get("interpolation", {})
    if not sweeps:
        return None
    plt = _matplotlib()
    fig, axis = plt.subplots(figsize=(4.2, 3.2))
    for attribute, sweep in sweeps.items():
        axis.plot(sweep["weights"], sweep["mean_reward"], marker="o", label=f"{attribute} (ρ={sweep['spearman']:.2f})")
    axis.set_xlabel("weight on the user of this reward")
    axis.set_ylabel("mean reward (z-score)")
    axis.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _mean_or_dash(mean: float | None) -> str:
    """A mean reward, or a dash where the run trained no such model (NaN: e.g. the smoke demo's one upper bound)."""
    return "—" if mean is None or math.isnan(mean) else f"{mean:.2f}"


def _ci(est: dict) -> str:
    return f"{_pct(est['value'])} [{_pct(est['ci95'][0])}, {_pct(est['ci95'][1])}]"


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _machine(results: dict) -> str:
    """The box a run's runtime was measured on: CPUs, vector unit, one core's matmul GFLOP/s (– for older runs)."""
    machine = results.get("machine")
    if not machine:
        return "–"
    return (
        f"{machine['cpu']}, {machine['logical_cpus']} CPUs, {machine['vector_unit']}, "
        f"{machine['gflops_one_core']:.0f} GFLOP/s per core"
    )


def render_results_markdown(
    runs: list[dict], command: str, investigation: str | None = None, beta_sweep: dict | None = None
) -> str:
    """RESULTS.md: the numbers of `ppd demo` runs (one per seed, side by side), against the targets and the paper.

    Each run is a results dict with its `seed`, `preset`, `runtime_s`, `beta` (per method) and `figures` (paths
    relative to RESULTS.md); `beta_sweep` is the record of `ppd sweep beta` (validation scores per method and β)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    heads = [f"seed {seed}" for seed in seeds]
    lines = [
        "# Results: toy-world replication of PPD",
        "",
        f"Generated by `{command}` once per seed (`--seed S`; the toy world, splits, training and evaluation all follow "
        "S). Do not edit by hand: rerun the command.",
        "",
        "| seed | preset | runtime | machine | β (PPD / Diffusion-DPO) | β from |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['seed']} | {r.get('preset')} | {r.get('runtime_s', float('nan')):.0f} s | {_machine(r)} | "
            f"{_betas(r)} | {r.get('beta_source', '–')} |"
            for r in runs
        ],
        "",
        *_beta_sweep_lines(beta_sweep),
        "## Targets",
        "",
        "| target | goal | " + " | ".join(heads) + " |",
        "| --- | --- |" + " --- |" * len(runs),
    ]
    per_run = [{c.name: c for c in target_checks(r)} for r in runs]
    names = list(dict.fromkeys(name for checks in per_run for name in checks))
    for name in names:
        goal = next(checks[name].target for checks in per_run if name in checks)
        cells = [f"{checks[name].value} ({_check(checks[name].met)})" if name in checks else "–" for checks in per_run]
        lines.append(f"| {name} | {goal} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(r.get("base_quality") for r in runs):
        lines += [
            "## Does the toy base draw the toy world? (quality gate)",
            "",
            "The base's own samples in each evaluation, measured from pixels against the toy world's renders of the same "
            "captions: an object is drawn (a two-colour fit explains the image: contrast, a residual small beside it, a "
            "coherent region of at least half the smallest toy object), its colour and shape are the caption's, and each reward "
            "attribute's distribution is close to the renders' (two-sample KS statistic). The measures are validated on "
            "renders, on background-only renders and on images a person judged (`tests/unit/test_base_quality.py`).",
            "",
            "| measure | goal | " + " | ".join(heads) + " |",
            "| --- | --- |" + " --- |" * len(runs),
        ]
        gates = [r.get("base_quality") or {} for r in runs]
        for name, label in (
            ("object_present", "object drawn"),
            ("colour_match", "colour of the caption"),
            ("shape_match", "shape of the caption"),
        ):
            goal = next(g[name]["target"] for g in gates if g)
            cells = [f"{_pct(g[name]['value'])} ({_check(g[name]['met'])})" if g else "–" for g in gates]
            lines.append(f"| {label} | ≥ {_pct(goal)} | " + " | ".join(cells) + " |")
        for attribute in ATTRIBUTES:
            cells = [
                f"{g['ks'][attribute]['value']:.3f} ({_check(g['ks'][attribute]['met'])})" if g else "–" for g in gates
            ]
            goal = next(g["ks"][attribute]["target"] for g in gates if g)
            lines.append(f"| KS {attribute} | ≤ {goal} | " + " | ".join(cells) + " |")
        lines.append("| samples | | " + " | ".join(str(g.get("samples", "–")) for g in gates) + " |")
        lines.append("")
    if any(r.get("one_reward") for r in runs):
        lines += [
            "## One-reward users (paper Sec. 5.1, Table 1, Fig. 3)",
            "",
            "Mean reward (z-score of the attribute) per model; PPD's win rate against the base on paired seeds "
            f"(target ≥ {_pct(TARGETS['one_reward_win_rate'])}; paper 60/90/93%).",
            "",
            "| seed | reward | base | Diffusion-DPO | SFT | PPD | DPO upper bound | PPD win rate vs base |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            for attribute, entry in r.get("one_reward", {}).items():
                m = entry["mean"]
                lines.append(
                    f"| {r['seed']} | {attribute} | {m['base']:.2f} | {m['dpo']:.2f} | {m['sft']:.2f} | {m['ppd']:.2f} | "
                    f"{_mean_or_dash(m.get('dpo_upper'))} | {_ci(entry['win_rate_vs_base'])} |"
                )
        lines.append("")
    if any(r.get("interpolation") for r in runs):
        lines += [
            "## Interpolation (paper Fig. 4)",
            "",
            "PPD conditioned on w·e_k + (1−w)·e_next; Spearman correlation between w and the mean reward k over "
            f"w ∈ {{0, .25, .5, .75, 1}} (target ≥ {TARGETS['interpolation_spearman']}); per-image correlation beside it.",
            "",
            "| seed | reward | mean reward at w = 0 … 1 | Spearman (means) | Spearman (per image) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            for attribute, sweep in r.get("interpolation", {}).items():
                rewards = " / ".join(f"{x:.2f}" for x in sweep["mean_reward"])
                lines.append(
                    f"| {r['seed']} | {attribute} | {rewards} | {sweep['spearman']:.2f} | "
                    f"{sweep['spearman_per_image']:.2f} |"
                )
        lines.append("")
    if any(r.get("population") for r in runs):
        lines += [
            "## Population users (paper Sec. 5.2, Fig. 5)",
            "",
            "Win rate of PPD against the base under each user's hidden reward, 95% CI resampling users "
            "(targets ≥ 80% seen, ≥ 75% unseen; paper 83% / 78%).",
            "",
            "| seed | split | users | win rate vs base [95% CI] | mean reward base → PPD |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in runs:
            for split, entry in r.get("population", {}).items():
                m = entry["mean_reward"]
                lines.append(
                    f"| {r['seed']} | {split} | {entry['users']} | {_ci(entry['win_rate_vs_base'])} | "
                    f"{m['base']:.2f} → {m['ppd']:.2f} |"
                )
        lines.append("")
    classified = [r for r in runs if r.get("classifier")]
    if classified:
        lines += ["## User classification from embeddings (paper Fig. 2)", ""]
        for r in classified:
            c = r["classifier"]
            lines.append(
                f"- seed {r['seed']}: top-16 accuracy {_pct(c['top16'])} against chance {_pct(c['chance16'])} "
                f"({c.get('users', '?')} users; embedder `{c.get('embedder', '?')}`)."
            )
        lines.append("")
    judged = [r for r in runs if r.get("judge")]
    if judged:
        lines += ["## Judge (supplementary B.3)", ""]
        for r in judged:
            j = r["judge"]
            lines.append(
                f"- seed {r['seed']}: backend `{j['backend']}` on {j['pairs']} held-out pairs: accuracy against the "
                f"users' labels {_pct(j['accuracy'])} (paper's VLM judge: 83%), dropped as inconsistent "
                f"{_pct(j['dropped_share'])}."
            )
        lines.append("")
    if any(r.get("objects") for r in runs):
        variants = list(dict.fromkeys(v for r in runs for v in r.get("objects", {})))
        lines += [
            "## Does each model draw the object?",
            "",
            "Share of generated images with an object (the quality gate's measure) and the mean object area, beside the "
            "toy world's own renders. Size and centredness rewards can only move where objects are drawn.",
            "",
            "| images of | " + " | ".join(f"{h}: with an object, mean area" for h in heads) + " |",
            "| --- |" + " --- |" * len(runs),
        ]
        for variant in variants:
            cells = []
            for r in runs:
                entry = r.get("objects", {}).get(variant)
                cells.append(f"{_pct(entry['object_rate'])}, {entry['mean_size']:.3f}" if entry else "–")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    rewarded = [r for r in runs if r.get("image_rewards")]
    if rewarded:
        variants = sorted({v for r in rewarded for means in r["image_rewards"].values() for v in means})
        lines += [
            "## Real-image rewards",
            "",
            "Mean CLIP score / LAION aesthetic / HPSv2 per model, computed by the same code that scores real images; "
            "with the locally built tiny random encoders of the toy world these numbers only show the plumbing.",
            "",
            "| seed | reward | " + " | ".join(variants) + " |",
            "| --- | --- |" + " --- |" * len(variants),
        ]
        for r in rewarded:
            for name, means in r["image_rewards"].items():
                values = " | ".join(f"{means.get(v, float('nan')):.3f}" for v in variants)
                lines.append(f"| {r['seed']} | {name} | {values} |")
        lines.append("")
    if any(r.get("figures") for r in runs):
        lines += ["## Figures", ""]
        for r in runs:
            for name, path in r.get("figures", {}).items():
                lines.append(f"![{name}, seed {r['seed']}]({path})")
        lines.append("")
    notes = [f"seed {r['seed']}: {n}" for r in runs for n in r.get("notes", [])]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if investigation:
        lines += [investigation.strip(), ""]
    return "\n".join(lines)
