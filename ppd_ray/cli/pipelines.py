"""`ppd demo` and `ppd sweep beta`: sequences of Ray jobs on a local head (`ppd_ray.pipelines`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ppd_ray.cli.options import OverrideOption, PresetOption, config_or_fail, fail
from ppd_ray.cli.toy import generate_toy_world
from ppd_ray.console import JobError


def demo(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="where RESULTS.md, results/seed<S>.json and results_figures/ go"),
    ] = Path("."),
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="intermediate outputs: toy world, prepared data, embeddings, runs, MLflow store "
            "(default runs/demo for seed 0, runs/demo-seed<S> otherwise)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the whole run: toy world, splits, training, evaluation")] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            help="keep the stages an interrupted run of the same workdir finished with the same commands; run the rest"
        ),
    ] = False,
    render_only: Annotated[
        bool, typer.Option(help="only rewrite RESULTS.md from the results/seed<S>.json in --out (no jobs run)")
    ] = False,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """The main job on the embedded default: toy world -> prepare -> embed -> precompute -> train (PPD + baselines)
    -> evaluate, each submitted as a Ray job to a local head; writes results/seed<S>.json and RESULTS.md (every
    seed's results side by side) into --out, and prints this run's targets."""
    from ppd.eval.report import target_checks
    from ppd_ray.pipelines.demo import rerender_results, run_demo, summary_table

    cfg = config_or_fail(preset, overrides, [f"data.seed={seed}"])
    command = " ".join(["ppd demo", *(["--preset", preset] if preset != "tiny_cpu" else [])])
    command += "".join(f" --set {item}" for item in overrides or [])
    if render_only:
        try:
            typer.echo(f"rewrote {rerender_results(out, command)}")
        except JobError as err:
            fail(str(err))
        return
    if workdir is None:
        workdir = Path("runs/demo") if seed == 0 else Path(f"runs/demo-seed{seed}")
    try:
        results = run_demo(cfg, workdir, out, list(overrides or []), seed, command, generate_toy_world, resume)
    except JobError as err:
        fail(str(err))
    typer.echo(summary_table(results))
    checks_met = all(check.met for check in target_checks(results))
    typer.secho(
        f"== done in {results['runtime_s']:.0f}s (seed {seed}): "
        f"{'every target met' if checks_met else 'some targets MISSED'}; {out / 'RESULTS.md'}, "
        f"{out / 'results' / f'seed{seed}.json'}; compare the training runs with "
        f"`ppd runs compare --set tracking.local_store={workdir}/mlflow`",
        bold=True,
    )


sweep_app = typer.Typer(help="Hyper-parameter sweeps scored on the validation split (never on test splits).")


@sweep_app.command("beta")
def sweep_beta(
    betas: Annotated[
        str, typer.Option(help="comma-separated β values (β·T is Diffusion-DPO's beta_dpo)")
    ] = "0.0625,0.125,0.25,0.5,2,8",
    methods: Annotated[str, typer.Option(help="comma-separated methods to choose β for")] = "ppd,dpo",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="where results/beta_sweep.json goes (ppd demo reads it)")
    ] = Path("."),
    workdir: Annotated[
        Path, typer.Option(help="the demo's workdir: its toy world, prepared data and inputs are reused")
    ] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="seed of the toy world, splits and training")] = 0,
    object_rate_margin: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="a β is eligible when its validation object rate is ≥ the base's minus this share (0.05 = 5 points)",
        ),
    ] = 0.0,
    choose_only: Annotated[
        bool,
        typer.Option(
            "--choose-only",
            help="no training or scoring: apply the choice rule again to the scores in <out>/results/beta_sweep.json",
        ),
    ] = False,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Choose β per method on the validation split (paper B.1): one training per (method, β) under one MLflow parent
    run, each scored on validation captions; per method the best validation reward among the β whose images still
    draw the toy world (object rate ≥ the base's) wins; where none does, the β drawing objects most often. Writes the
    choice that `ppd demo` then uses."""
    from ppd_ray.pipelines.demo import BETA_CHOICE, RESULTS_DIR
    from ppd_ray.pipelines.sweep import format_sweep, rechoose, run_beta_sweep

    if choose_only:
        path = out / RESULTS_DIR / BETA_CHOICE
        if not path.is_file():
            fail(f"--choose-only: no sweep record at {path}; run `ppd sweep beta` without it first")
        try:
            record = rechoose(path, object_rate_margin)
        except ValueError as err:
            fail(str(err))
        typer.echo(format_sweep(record))
        return

    cfg = config_or_fail(preset, overrides, [f"data.seed={seed}"])
    try:
        beta_values = [float(b) for b in betas.split(",") if b.strip()]
    except ValueError:
        fail(f"--betas {betas!r}: expected numbers separated by commas, e.g. 0.5,2,8")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not beta_values or any(b <= 0 for b in beta_values):
        fail("--betas: give at least one β > 0")
    unknown = sorted(set(method_list) - {"ppd", "dpo"})
    if unknown or not method_list:
        fail(f"--methods: choose from ppd, dpo (got {methods!r})")
    try:
        record = run_beta_sweep(
            cfg,
            workdir,
            out,
            list(overrides or []),
            seed,
            beta_values,
            method_list,
            generate_toy_world,
            object_rate_margin,
        )
    except JobError as err:
        fail(str(err))
    typer.echo(format_sweep(record))
