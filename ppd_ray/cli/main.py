"""The `ppd` command line: one entry point for the toy world, the jobs and the demo.

Pure commands (toy, config, model) call `ppd` directly; job commands run the same code as `python -m ppd_ray.jobs.<job>`
(what `ray job submit` runs) on a local Ray, or on the cluster named by RAY_ADDRESS.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ppd.config import ATTRIBUTES, PRESETS, ConfigError, PPDConfig, load_config
from ppd_ray.cli.check_real import check_real_command
from ppd_ray.cli.embed import embed_app
from ppd_ray.cli.model import model_app
from ppd_ray.cli.serve import serve_command
from ppd_ray.console import JobError

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="PPD on Ray: personalised preference fine-tuning of diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(embed_app, name="embed")
app.command("serve")(serve_command)
app.command("check-real")(check_real_command)

PresetOption = Annotated[str, typer.Option("--preset", "-p", help=f"config preset: {', '.join(PRESETS)}")]
OverrideOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
]


def _config(preset: str, overrides: list[str] | None, extra: list[str] = ()) -> PPDConfig:
    try:
        return load_config(preset, [*(overrides or []), *extra])
    except ConfigError as err:
        _fail(str(err))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


# --- config ---------------------------------------------------------------------------------------------------------


@config_app.command("show")
def config_show(
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json")] = "yaml",
) -> None:
    """Print the full validated config of a preset (with overrides applied)."""
    cfg = _config(preset, overrides)
    typer.echo(cfg.to_json() if fmt == "json" else cfg.to_yaml())


@config_app.command("presets")
def config_presets() -> None:
    """List the named presets."""
    for name, factory in PRESETS.items():
        typer.echo(f"{name:22s} {(factory.__doc__ or '').strip().splitlines()[0]}")


# --- toy world ------------------------------------------------------------------------------------------------------

toy_app = typer.Typer(help="The toy world: procedural images and synthetic users with hidden rewards.")
app.add_typer(toy_app, name="toy")


@toy_app.callback(invoke_without_command=True)
def toy(
    ctx: typer.Context,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="output folder (pairs/, hidden/, manifest.json)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed: same seed and preset give identical files")] = 0,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Generate the toy world in the Pick-a-Pic v2 schema: `ppd toy --out DIR --seed S`."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        _fail("--out is required (the folder to write the toy world into)")
    cfg = _config(preset, overrides)
    generate_toy_world(cfg, out, seed)


def generate_toy_world(cfg: PPDConfig, out: Path, seed: int) -> dict:
    """Write the toy world and print what was written."""
    from ppd.data.toyworld import write_toy_world

    toy_cfg = cfg.data.toy
    total = (
        len(ATTRIBUTES) * toy_cfg.one_reward_pairs_per_user
        + toy_cfg.population_users * toy_cfg.population_pairs_per_user
    )
    done = 0

    def progress(population: str, rows: int) -> None:
        nonlocal done
        done += rows
        logger.info(f"toy world: {done}/{total} pairs ({population})")

    logger.info(f"toy world: rendering {total} pairs of {toy_cfg.image_size}x{toy_cfg.image_size} images, seed {seed}")
    manifest = write_toy_world(out, toy_cfg, seed, progress=progress)
    for population, counts in manifest["populations"].items():
        typer.echo(
            f"{population:11s} {counts['users']:4d} users {counts['pairs']:6d} pairs -> {out}/pairs/{population}/"
        )
    typer.echo(f"hidden rewards (evaluation only) -> {out}/hidden/rewards.json")
    return manifest


@toy_app.command("pretrain-base")
def toy_pretrain_base(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="where the base goes (the demo reads assets/toy_base)")
    ] = Path("assets/toy_base"),
    steps: Annotated[int, typer.Option(help="total optimiser steps of the run (fresh images every step)")] = 12_000,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the images and the noise")] = 0,
    resume_from: Annotated[
        Path | None,
        typer.Option(help="continue a saved base: exactly from its training_state/ if present, else warm-start"),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="stop after this long and save (resume later with --resume-from)")
    ] = None,
    gate_samples: Annotated[int, typer.Option(help="samples the quality gate is measured on (0 = skip)")] = 256,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Pretrain the tiny Stage C and its text encoder on the toy world (the stand-in for pretrained Stable Cascade),
    then measure its quality gate: object drawn, caption colour and shape, attribute distributions (KS)."""
    from ppd.eval.base_quality import format_gate, measure_base
    from ppd.eval.generate import VariantGenerator
    from ppd.train.pretrain import PretrainSettings, pretrain_toy_base, read_record, write_record

    cfg = _config(preset, overrides)
    if resume_from is not None and not (resume_from / "prior" / "config.json").is_file():
        _fail(f"--resume-from {resume_from}: not a saved toy base (no prior/config.json)")
    settings = PretrainSettings(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        resume_from=resume_from,
        max_seconds=None if max_minutes is None else max_minutes * 60,
    )
    try:
        summary = pretrain_toy_base(
            cfg, settings, out, progress=lambda step, loss: logger.info(f"step {step}/{steps} loss {loss:.4f}")
        )
    except ValueError as err:
        _fail(str(err))
    state = "finished" if summary["finished"] else "stopped early (continue with --resume-from)"
    typer.echo(f"toy base -> {out}: step {summary['steps_done']}/{steps} {state}, loss {summary['final_loss']:.4f}")
    if gate_samples > 0:
        logger.info(f"quality gate on {gate_samples} samples")
        base = VariantGenerator(cfg.with_overrides([f"model.stage_c_path={out.resolve()}"]), None)
        gate = measure_base(base.generate, cfg.data.toy.image_size, gate_samples, seed)
        write_record(out, {**read_record(out), "quality_gate": gate})
        typer.echo(format_gate(gate))


# --- jobs -----------------------------------------------------------------------------------------------------------


@app.command()
def prepare(
    input: Annotated[Path, typer.Option("--input", "-i", help="Pick-a-Pic v2 parquet file or folder of shards")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: <split>/, groups/, accounting.json")],
    shots: Annotated[int | None, typer.Option(help="pairs per few-shot group (default from preset: 4)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the splits and groups (default from preset)")] = None,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Filter, split and group preference pairs with Ray Data (same code as `python -m ppd_ray.jobs.prepare`)."""
    extra = [f"data.shots={shots}"] * (shots is not None) + [f"data.seed={seed}"] * (seed is not None)
    cfg = _config(preset, overrides, extra)
    run_prepare(cfg, input, out)


def run_prepare(cfg: PPDConfig, input: Path, out: Path) -> dict:
    from ppd_ray.jobs.prepare import format_accounting, run

    try:
        report = run(cfg, input, out)
    except JobError as err:
        _fail(str(err))
    typer.echo(format_accounting(report))
    typer.echo(f"accounting -> {out}/accounting.json")
    return report


@app.command()
def precompute(
    prepared: Annotated[Path, typer.Option("--prepared", help="output folder of `ppd prepare`")],
    embeddings: Annotated[Path, typer.Option("--embeddings", help="output folder of `ppd embed`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder of the precomputed training inputs")],
    splits: Annotated[str, typer.Option(help="comma-separated splits to precompute")] = "train",
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Latents, caption states and user embeddings for training, once (same code as `python -m ppd_ray.jobs.precompute`)."""
    run_precompute(_config(preset, overrides), prepared, embeddings, out, tuple(splits.split(",")))


def run_precompute(cfg: PPDConfig, prepared: Path, embeddings: Path, out: Path, splits: tuple[str, ...]):
    from ppd_ray.jobs.precompute import format_manifest, run

    try:
        manifest = run(cfg, prepared, embeddings, out, splits)
    except JobError as err:
        _fail(str(err))
    typer.echo(format_manifest(manifest, out))
    return manifest


@app.command()
def train(
    precomputed: Annotated[Path, typer.Option("--precomputed", help="output folder of `ppd precompute`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder: adapter/, summary.json, checkpoints")],
    method: Annotated[str | None, typer.Option(help="ppd, dpo or sft (default: the preset's)")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: config, else a loopback server)")
    ] = None,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Fine-tune the user adapter with Ray Train + DeepSpeed (same code as `python -m ppd_ray.jobs.train`)."""
    cfg = _config(preset, overrides, [f"train.method={method}"] * (method is not None))
    run_train(cfg, precomputed, out, tracking_uri)


def run_train(cfg: PPDConfig, precomputed: Path, out: Path, tracking_uri: str | None = None):
    from ppd_ray.jobs.train import TrainingFailed, run

    try:
        result = run(cfg, precomputed, out, tracking_uri)
    except (JobError, TrainingFailed) as err:
        _fail(str(err))
    typer.echo(f"adapter {result.adapter_dir}  MLflow run {result.run_id}  ({result.steps} steps)")
    return result


runs_app = typer.Typer(help="Training runs tracked in MLflow.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("compare")
def runs_compare(
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the preset's)")] = None,
    evaluations: Annotated[bool, typer.Option(help="also list evaluation runs (every results number)")] = False,
    uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: config, else the local store)")
    ] = None,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Print an experiment's runs side by side: params that differ, final metrics."""
    from ppd_ray.infra.mlflow_server import tracking_uri
    from ppd_ray.tracking import compare_runs

    cfg = _config(preset, overrides)
    uri = uri or cfg.tracking.uri
    store = Path(cfg.tracking.local_store)
    if uri is None and not (store / "mlflow.db").is_file():
        _fail(f"no MLflow store at {store} (train a run first, or pass --tracking-uri)")
    try:
        with tracking_uri(uri, store) as served:
            typer.echo(compare_runs(served, experiment or cfg.tracking.experiment, include_evaluations=evaluations))
    except JobError as err:
        _fail(str(err))


@app.command()
def evaluate(
    world: Annotated[Path, typer.Option("--world", help="toy world folder (its hidden rewards score the images)")],
    adapters: Annotated[Path, typer.Option("--adapters", help="JSON {variant: adapter folder} (ppd, dpo, sft, ...)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for results.json, scores and plots")],
    one_reward_prepared: Annotated[
        Path | None, typer.Option(help="prepared one-reward users (Sec. 5.1 experiments)")
    ] = None,
    population_prepared: Annotated[Path | None, typer.Option(help="prepared population (Sec. 5.2)")] = None,
    population_embeddings: Annotated[Path | None, typer.Option(help="embeddings of the population's groups")] = None,
    classifier: Annotated[Path | None, typer.Option(help="classifier.json of `ppd embed classify`")] = None,
    seed: Annotated[int, typer.Option(help="seed of captions, users and generation")] = 0,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Generate, score and compare every model variant (same code as `python -m ppd_ray.jobs.evaluate`)."""
    from ppd_ray.jobs.evaluate import main as evaluate_main

    argv = ["--preset", preset, "--world", str(world), "--adapters", str(adapters), "--out", str(out)]
    for item in overrides or []:
        argv += ["--set", item]
    for flag, value in (
        ("--one-reward-prepared", one_reward_prepared),
        ("--population-prepared", population_prepared),
        ("--population-embeddings", population_embeddings),
        ("--classifier", classifier),
    ):
        if value is not None:
            argv += [flag, str(value)]
    code = evaluate_main([*argv, "--seed", str(seed)])
    if code:
        raise typer.Exit(code)


@app.command()
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
        bool, typer.Option(help="keep the stages an interrupted run of the same workdir finished; run the rest")
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

    cfg = _config(preset, overrides, [f"data.seed={seed}"])
    command = " ".join(["ppd demo", *(["--preset", preset] if preset != "tiny_cpu" else [])])
    command += "".join(f" --set {item}" for item in overrides or [])
    if render_only:
        try:
            typer.echo(f"rewrote {rerender_results(out, command)}")
        except JobError as err:
            _fail(str(err))
        return
    if workdir is None:
        workdir = Path("runs/demo") if seed == 0 else Path(f"runs/demo-seed{seed}")
    try:
        results = run_demo(cfg, workdir, out, list(overrides or []), seed, command, generate_toy_world, resume)
    except JobError as err:
        _fail(str(err))
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
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("beta")
def sweep_beta(
    betas: Annotated[str, typer.Option(help="comma-separated β values (β·T is Diffusion-DPO's beta_dpo)")] = "0.5,2,8",
    methods: Annotated[str, typer.Option(help="comma-separated methods to choose β for")] = "ppd,dpo",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="where results/beta_sweep.json goes (ppd demo reads it)")
    ] = Path("."),
    workdir: Annotated[
        Path, typer.Option(help="the demo's workdir: its toy world, prepared data and inputs are reused")
    ] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="seed of the toy world, splits and training")] = 0,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Choose β per method on the validation split (paper B.1): one training per (method, β) under one MLflow parent
    run, each scored on validation captions; writes the choice that `ppd demo` then uses."""
    from ppd_ray.pipelines.sweep import format_sweep, run_beta_sweep

    cfg = _config(preset, overrides, [f"data.seed={seed}"])
    try:
        beta_values = [float(b) for b in betas.split(",") if b.strip()]
    except ValueError:
        _fail(f"--betas {betas!r}: expected numbers separated by commas, e.g. 0.5,2,8")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not beta_values or any(b <= 0 for b in beta_values):
        _fail("--betas: give at least one β > 0")
    unknown = sorted(set(method_list) - {"ppd", "dpo"})
    if unknown or not method_list:
        _fail(f"--methods: choose from ppd, dpo (got {methods!r})")
    try:
        record = run_beta_sweep(
            cfg, workdir, out, list(overrides or []), seed, beta_values, method_list, generate_toy_world
        )
    except JobError as err:
        _fail(str(err))
    typer.echo(format_sweep(record))


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
