"""`ppd model ...`: model inspection commands (parameter counts, and the real-scale training plan, of Stage C + the
user adapter), all on the meta device."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ppd.config import PRESETS, ConfigError, load_config
from ppd.models.factory import build_meta_personalized_stage_c, parameter_report
from ppd.models.stage_c import ARCHITECTURES
from ppd.train.sizing import PICKAPIC_TRAIN_PAIRS, size_training

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


@model_app.command("plan")
def plan(
    preset: Annotated[
        str, typer.Option("--preset", "-p", help=f"config preset with training settings ({', '.join(PRESETS)})")
    ] = "stage_c_lite_h100x8",
    embedding_shape: Annotated[
        str | None, typer.Option("--embedding-shape", help="user embedding LxD (default 29x3584 for real models)")
    ] = None,
    pairs: Annotated[
        int, typer.Option("--pairs", min=1, help="preference pairs in one epoch (Pick-a-Pic v2: ~0.8M)")
    ] = PICKAPIC_TRAIN_PAIRS,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override a config field, e.g. --set train.micro_batch=8")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (layout: ppd/train/sizing.py)")] = False,
) -> None:
    """Size a preset's training on the meta device: parameters, FLOPs per DPO pair, memory per GPU, epoch time."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"{preset!r} is not a config preset; choose one of: {', '.join(PRESETS)}")
    try:
        cfg = load_config(preset, overrides or [])
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    shape = _parse_shape(embedding_shape) if embedding_shape else DEFAULT_EMBEDDING_SHAPES[cfg.model.architecture]
    try:
        report = size_training(cfg, shape, pairs=pairs).to_dict()
    except ValueError as err:  # e.g. train.method=sft: no DPO pair to size
        raise typer.BadParameter(str(err)) from None
    typer.echo(json.dumps(report, indent=2) if as_json else format_plan(report))


def format_plan(report: dict) -> str:
    """The plan as Markdown tables (what BENCHMARKS.md shows)."""
    params, flops, memory, epoch = report["parameters"], report["flops"], report["memory_per_gpu"], report["epoch"]
    latent = "x".join(str(side) for side in report["latent_shape"])
    lines = [
        f"Plan for `{report['preset']}`: Stage C {report['architecture']} in {report['dtype']}, latents {latent}, "
        f"{report['text_tokens']} text tokens, user embedding {report['embedding_shape'][0]}x"
        f"{report['embedding_shape'][1]} -> {report['user_tokens']} user tokens; counted on the meta device "
        f"(FLOPs: torch FlopCounterMode, {flops['attention_kernel']} attention; micro-batch {flops['micro_batch']} pairs)",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| parameters: total | {params['total']:,} |",
        f"| parameters: frozen base | {params['base']:,} |",
        f"| parameters: trainable adapter ({params['attention_blocks']} blocks) | {params['trainable']:,} |",
        f"| &nbsp;&nbsp;W'_k + W'_v | {params['w_k_plus_w_v']:,} |",
        f"| &nbsp;&nbsp;user projection | {params['user_projection']:,} |",
        f"| FLOPs: base forward, 1 image | {_tera(flops['per_image_forward'])} |",
        f"| FLOPs: adapter (user branch) forward, 1 image | {_tera(flops['adapter_per_image_forward'])} |",
        f"| FLOPs per DPO pair: policy forward, 2 images | {_tera(flops['policy_forward_per_pair'])} |",
        f"| FLOPs per DPO pair: policy backward, 2 images | {_tera(flops['policy_backward_per_pair'])} |",
        f"| FLOPs per DPO pair: reference forward, 2 images | {_tera(flops['reference_forward_per_pair'])} |",
        f"| **FLOPs per DPO pair** | **{_tera(flops['per_pair'])}** |",
        "",
        f"Memory per GPU, ZeRO-{memory['zero_stage']} over {memory['data_parallel_workers']} workers, "
        f"micro-batch {memory['micro_batch']} pairs ({2 * memory['micro_batch']} images through the policy):",
        "",
        "| memory per GPU | no checkpointing | block checkpointing (estimate) |",
        "| --- | ---: | ---: |",
    ]
    for label, key in (
        ("frozen base weights", "base_weights_bytes"),
        ("adapter weights", "adapter_weights_bytes"),
        ("adapter gradients (sharded)", "adapter_gradients_bytes"),
        ("AdamW state + fp32 master (sharded)", "optimizer_state_bytes"),
    ):
        lines.append(f"| {label} | {_gib(memory[key])} | {_gib(memory[key])} |")
    fits = {key: memory[key] <= memory["gpu_memory_bytes"] for key in ("total_bytes", "total_checkpointed_bytes")}
    lines += [
        f"| activations saved for backward | {_gib(memory['activations_bytes'])} | "
        f"{_gib(memory['activations_checkpointed_bytes'])} |",
        f"| **total** (GPU: {_gib(memory['gpu_memory_bytes'])}) | **{_gib(memory['total_bytes'])}**"
        f"{'' if fits['total_bytes'] else ' (does not fit)'} | **{_gib(memory['total_checkpointed_bytes'])}**"
        f"{'' if fits['total_checkpointed_bytes'] else ' (does not fit)'} |",
        "",
        f"Epoch of {epoch['pairs']:,} pairs ({epoch['steps']:,} optimiser steps) on {epoch['gpus']} x {epoch['gpu']} "
        f"({epoch['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s dense bf16 each):",
        "",
        "| MFU | epoch time |",
        "| ---: | ---: |",
    ]
    lines += [f"| {row['mfu']:.0%} | {_duration(row['seconds'])} |" for row in epoch["projections"]]
    lines.append(
        f"| paper (~{epoch['paper_seconds'] / 3600:.0f} h) = {epoch['paper_implied_mfu']:.1%} MFU | "
        f"{_duration(epoch['paper_seconds'])} |"
    )
    if not memory["gradient_checkpointing_supported"]:
        lines += ["", "Gradient checkpointing with the user branch is refused by the current code (estimate only)."]
    return "\n".join(lines)


def _tera(flops: int) -> str:
    return f"{flops / 1e12:.3f} TFLOP" if flops >= 1e10 else f"{flops / 1e9:.3f} GFLOP"


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds / 60:.0f} min)"
