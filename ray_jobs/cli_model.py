"""`ppd model ...`: model inspection commands (parameter counts of Stage C + the user adapter)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ppd.config import PRESETS
from ppd.models.factory import build_meta_personalized_stage_c, parameter_report
from ppd.models.stage_c import ARCHITECTURES

model_app = typer.Typer(help="Inspect Stage C architectures and the user adapter.", no_args_is_help=True)


@model_app.callback()
def _model_group() -> None:
    # A callback keeps `model` a command group even with one command (so `model info` parses standalone too).
    pass


# LLaVA-OneVision 7B, final-token state of every layer (embeddings + 28 layers); the tiny default is an example.
DEFAULT_EMBEDDING_SHAPES = {"tiny": (4, 64), "stage_c_lite": (29, 3584), "stage_c": (29, 3584)}


def _architecture_and_tokens(preset: str, user_tokens: int | None) -> tuple[str, int]:
    if preset in ARCHITECTURES:
        return preset, user_tokens or 4
    if preset in PRESETS:
        model_cfg = PRESETS[preset]().model
        return model_cfg.architecture, user_tokens or model_cfg.user_tokens
    raise typer.BadParameter(f"{preset!r} is neither an architecture ({', '.join(ARCHITECTURES)}) nor a preset")


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        layers, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"embedding shape {text!r} is not of the form LxD, e.g. 29x3584") from None
    if layers < 1 or width < 1:
        raise typer.BadParameter("embedding shape must be positive")
    return layers, width


@model_app.command("info")
def info(
    preset: Annotated[
        str, typer.Option("--preset", "-p", help=f"architecture ({', '.join(ARCHITECTURES)}) or config preset")
    ] = "stage_c_lite",
    embedding_shape: Annotated[
        str | None, typer.Option("--embedding-shape", help="user embedding LxD (default 29x3584 for real models)")
    ] = None,
    user_tokens: Annotated[
        int | None, typer.Option("--user-tokens", help="user tokens T_u (default: preset's)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Build Stage C + user adapter on the meta device (no weights, no memory) and print parameter counts."""
    architecture, tokens = _architecture_and_tokens(preset, user_tokens)
    shape = _parse_shape(embedding_shape) if embedding_shape else DEFAULT_EMBEDDING_SHAPES[architecture]
    report = parameter_report(build_meta_personalized_stage_c(architecture, shape, tokens))
    if as_json:
        summary = {"architecture": architecture, "embedding_shape": list(shape), "user_tokens": tokens, **report}
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"Stage C {architecture}: {report['attention_blocks']} attention blocks; "
        f"user embedding [{shape[0]}, {shape[1]}] -> {tokens} user tokens"
    )
    rows = [
        ("total parameters", report["total"]),
        ("base (frozen)", report["base"]),
        ("adapter (trainable)", report["trainable"]),
        ("  W'_k", report["w_k"]),
        ("  W'_v", report["w_v"]),
        ("  W'_k + W'_v", report["w_k_plus_w_v"]),
        ("  user projection", report["user_projection"]),
    ]
    for label, count in rows:
        typer.echo(f"  {label:<22}{count:>16,}")
