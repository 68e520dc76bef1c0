"""The `ppd` command line: one entry point for the toy world, the jobs, the demo and the server.

Job commands (`ppd prepare`, `ppd embed`, `ppd embed classify`, `ppd precompute`, `ppd train`, `ppd evaluate`) hand
their arguments to the job's own parser and `main` (`python -m ppd_ray.jobs.<job>`, what `ray job submit` runs): one
definition of every job flag, and `ppd <job> --help` is the job's help. They run on a local Ray, or on the cluster
named by RAY_ADDRESS. The other commands are typer commands of their own modules in this package.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated

import typer

from ppd.config import PRESETS
from ppd_ray.cli.check_real import check_real_command
from ppd_ray.cli.model import model_app
from ppd_ray.cli.options import OverrideOption, PresetOption, config_or_fail, fail
from ppd_ray.cli.pipelines import demo, sweep_app
from ppd_ray.cli.serve import serve_command
from ppd_ray.cli.toy import toy_app
from ppd_ray.console import JobError, setup_logging

app = typer.Typer(
    help="PPD on Ray: personalised preference fine-tuning of diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configurations.", no_args_is_help=True)
runs_app = typer.Typer(help="Training runs tracked in MLflow.", no_args_is_help=True)

# `ppd <command>` -> the job module whose parser and main it runs.
JOB_COMMANDS = {
    "prepare": "prepare",
    "embed": "embed",
    "precompute": "precompute",
    "train": "train",
    "evaluate": "evaluate",
}
# Everything after the command name goes to the job's own argparse parser, --help included.
_TO_THE_JOB = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _job_summary(module: str) -> str:
    """The first line of a job's docstring, read without importing the job (jobs import torch, pyarrow, Ray...)."""
    source = Path(importlib.util.find_spec(f"ppd_ray.jobs.{module}").origin).read_text()
    summary = (
        (ast.get_docstring(ast.parse(source)) or "").splitlines()[0].removeprefix("Ray job: ").removeprefix("Job: ")
    )
    return summary[:1].upper() + summary[1:]


def _run_job(module: str, argv: list[str], command: str) -> None:
    job = importlib.import_module(f"ppd_ray.jobs.{module}")
    raise typer.Exit(job.main(argv, prog=command))


def _job_command(name: str, module: str) -> None:
    def command(ctx: typer.Context) -> None:
        if name == "embed" and ctx.args[:1] == ["classify"]:  # `ppd embed classify`: the classifier job
            _run_job("classify", ctx.args[1:], "ppd embed classify")
        _run_job(module, ctx.args, f"ppd {name}")

    summary = _job_summary(module)
    if name == "embed":
        summary += f" `ppd embed classify --help`: {_job_summary('classify')}"
    app.command(name, help=summary, context_settings=_TO_THE_JOB, add_help_option=False)(command)


for _name, _module in JOB_COMMANDS.items():
    _job_command(_name, _module)
app.add_typer(toy_app, name="toy")
app.command("demo")(demo)
app.add_typer(sweep_app, name="sweep")
app.add_typer(runs_app, name="runs")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.command("serve")(serve_command)
app.command("check-real")(check_real_command)


@config_app.command("show")
def config_show(
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json")] = "yaml",
) -> None:
    """Print the full validated config of a preset (with overrides applied)."""
    cfg = config_or_fail(preset, overrides)
    typer.echo(cfg.to_json() if fmt == "json" else cfg.to_yaml())


@config_app.command("presets")
def config_presets() -> None:
    """List the named presets."""
    for name, factory in PRESETS.items():
        typer.echo(f"{name:22s} {(factory.__doc__ or '').strip().splitlines()[0]}")


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

    cfg = config_or_fail(preset, overrides)
    uri = uri or cfg.tracking.uri
    store = Path(cfg.tracking.local_store)
    if uri is None and not (store / "mlflow.db").is_file():
        fail(f"no MLflow store at {store} (train a run first, or pass --tracking-uri)")
    try:
        with tracking_uri(uri, store) as served:
            typer.echo(compare_runs(served, experiment or cfg.tracking.experiment, include_evaluations=evaluations))
    except JobError as err:
        fail(str(err))


def main() -> None:
    """Console entry point."""
    setup_logging()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
