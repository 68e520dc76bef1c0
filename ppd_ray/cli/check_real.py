"""`ppd check-real`: every job of a cluster preset on the real checkpoints' layouts, checked on this machine's CPU.

The checks are `ppd.check.real`; this command picks the presets, hands in Serve's generator (`ppd_ray/serving/` imports Ray,
so `ppd` cannot) and prints one line per check. Exit status 2 when any check fails.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from ppd.config import ConfigError, PPDConfig, cluster_presets, load_config

logger = logging.getLogger(__name__)


def serve_generate(cfg: PPDConfig, jobs: Sequence[dict]) -> list[list[bytes]]:
    """The Serve Generator deployment's own code (model loading, batching of users and the base), outside Serve."""
    from ppd_ray.serving.generator import GenerationJob, ImageGenerator

    generator = ImageGenerator(cfg.to_dict())
    return generator._generate_jobs([GenerationJob(**job) for job in jobs])


def check_real_command(
    preset: Annotated[
        list[str] | None, typer.Option("--preset", "-p", help="cluster preset to check (repeatable; default: all)")
    ] = None,
    stage: Annotated[
        list[str] | None, typer.Option("--stage", help="run only these checks (config, stage_c, precompute, ...)")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override a config field of every checked preset")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(help="keep the reduced checkpoints here (reused next time); default: a temporary folder"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the reports as JSON")] = False,
) -> None:
    """Check that a cluster preset runs on the real checkpoints' layouts (meta device + reduced depth, no download)."""
    from ppd.check.real import STAGES, CheckFailed, check_real

    names = preset or cluster_presets()
    stages = tuple(stage or STAGES)
    try:
        configs = [load_config(name, overrides or []) for name in names]
    except ConfigError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    folder = workdir or Path(tempfile.mkdtemp(prefix="ppd-check-real-"))
    reports = []
    try:
        for cfg in configs:
            try:
                report = check_real(cfg, folder, stages, serve_generate=serve_generate, progress=logger.info)
            except (CheckFailed, ValueError) as err:
                typer.secho(f"error: {cfg.preset}: {err}", fg="red", err=True)
                raise typer.Exit(2) from None
            reports.append(report)
            if not as_json:
                typer.echo(report.format())
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    if as_json:
        typer.echo(json.dumps([report.to_dict() for report in reports], indent=2))
    if not all(report.ok for report in reports):
        raise typer.Exit(2)
