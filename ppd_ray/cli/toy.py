"""`ppd toy ...`: the toy world (procedural images, synthetic users with hidden rewards) and its pretrained base."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ppd.config import ATTRIBUTES, PPDConfig
from ppd_ray.cli.options import OverrideOption, PresetOption, config_or_fail, fail

logger = logging.getLogger(__name__)

toy_app = typer.Typer(help="The toy world: procedural images and synthetic users with hidden rewards.")


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
        fail("--out is required (the folder to write the toy world into)")
    cfg = config_or_fail(preset, overrides)
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
    text_encoder_from: Annotated[
        Path | None,
        typer.Option(
            help="a text encoder from `ppd toy pretrain-text` (frozen from the first step, like the real one)"
        ),
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

    cfg = config_or_fail(preset, overrides)
    if resume_from is not None and not (resume_from / "prior" / "config.json").is_file():
        fail(f"--resume-from {resume_from}: not a saved toy base (no prior/config.json)")
    if text_encoder_from is not None and not (text_encoder_from / "text_encoder" / "config.json").is_file():
        fail(
            f"--text-encoder-from {text_encoder_from}: no text_encoder/config.json (make one with `ppd toy pretrain-text`)"
        )
    settings = PretrainSettings(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        resume_from=resume_from,
        max_seconds=None if max_minutes is None else max_minutes * 60,
        text_encoder_from=text_encoder_from,
    )
    try:
        summary = pretrain_toy_base(
            cfg, settings, out, progress=lambda step, loss: logger.info(f"step {step}/{steps} loss {loss:.4f}")
        )
    except ValueError as err:
        fail(str(err))
    state = "finished" if summary["finished"] else "stopped early (continue with --resume-from)"
    typer.echo(f"toy base -> {out}: step {summary['steps_done']}/{steps} {state}, loss {summary['final_loss']:.4f}")
    if summary["interrupted"]:  # Ctrl-C: the user wants the machine back; the gate can be measured after a resume
        typer.echo(f"interrupted: saved; continue with --resume-from {out} --out {out}")
        return
    if gate_samples > 0:
        logger.info(f"quality gate on {gate_samples} samples")
        base = VariantGenerator(cfg.with_overrides([f"model.stage_c_path={out.resolve()}"]), None)
        grid = out / "samples.png"  # 16 samples over the toy world's renders of the same captions
        gate = measure_base(base.generate, cfg.data.toy.image_size, gate_samples, seed, grid_path=grid)
        write_record(out, {**read_record(out), "quality_gate": gate})
        typer.echo(format_gate(gate))
        typer.echo(f"samples (top) against the toy world's renders (bottom): {grid}")


@toy_app.command("pretrain-text")
def toy_pretrain_text(
    out: Annotated[Path, typer.Option("--out", "-o", help="where text_encoder/ and tokenizer/ go")],
    steps: Annotated[int, typer.Option(help="optimiser steps (fresh renders every step)")] = 2500,
    batch_size: Annotated[int, typer.Option(help="captions per step, of distinct (colour, shape) pairs (<= 48)")] = 48,
    seed: Annotated[int, typer.Option(help="seed of the weights, captions and renders")] = 0,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Pretrain the tiny CLIP text encoder contrastively on toy-world renders (CLIP's recipe, with a small image
    tower), so its states name the caption's shape as well as its colour; then `ppd toy pretrain-base
    --text-encoder-from OUT` trains the prior against it, frozen. Prints how well a linear probe reads colour and shape
    from the states before and after (held-out captions)."""
    from ppd.train.text_pretrain import TextPretrainSettings, pretrain_text_encoder_into

    cfg = config_or_fail(preset, overrides)
    if steps < 1 or batch_size < 2:
        fail("--steps must be >= 1 and --batch-size >= 2")
    record = pretrain_text_encoder_into(
        out,
        cfg.data.toy.image_size,
        TextPretrainSettings(steps=steps, batch_size=batch_size, seed=seed),
        progress=lambda step, loss, acc: logger.info(
            f"step {step}/{steps} loss {loss:.3f} own-image accuracy {acc:.2f}"
        ),
    )
    before, after = record["probe_before"], record["probe_after"]
    for name in before:
        typer.echo(f"{name:14s} linear probe (held-out captions): {before[name]:.0%} -> {after[name]:.0%}")
    typer.echo(f"text encoder -> {out} (then: ppd toy pretrain-base --text-encoder-from {out})")
