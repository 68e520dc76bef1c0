"""`ppd embed ...`: user embeddings from few-shot groups (Ray Data job), and the user classifier on them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ppd.config import PRESETS, ConfigError, load_config
from ppd_ray.console import JobError

logger = logging.getLogger(__name__)

embed_app = typer.Typer(help="Stage 1: few-shot preference groups -> user embeddings; user classifier.")

PresetOption = Annotated[str, typer.Option("--preset", "-p", help=f"config preset: {', '.join(PRESETS)}")]
OverrideOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a config field, e.g. --set embed.batch_size=4")
]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


@embed_app.callback(invoke_without_command=True)
def embed(
    ctx: typer.Context,
    prepared: Annotated[Path | None, typer.Option("--prepared", help="output folder of `ppd prepare`")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="folder for the embedding part files")] = None,
    embedder: Annotated[
        str | None, typer.Option("--embedder", "-e", help="vlm-hf | vlm-vllm | pairdiff (default from the preset)")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="VLM path (vlm-*) or CLIP vision path (pairdiff); default tiny")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="last | all | comma-separated hidden-state indices")] = None,
    limit: Annotated[int | None, typer.Option(help="embed at most this many not-yet-done groups")] = None,
    preset: PresetOption = "tiny_cpu",
    overrides: OverrideOption = None,
) -> None:
    """Embed every few-shot group of a prepared folder (resumable): `ppd embed --prepared DIR --out DIR`."""
    if ctx.invoked_subcommand is not None:
        return
    if prepared is None or out is None:
        _fail("--prepared and --out are required (or use a subcommand: ppd embed classify --help)")
    from ppd_ray.jobs.embed import format_summary, run, with_embed_args

    try:
        cfg = with_embed_args(load_config(preset, overrides or []), embedder, model, layers)
        summary = run(cfg, prepared, out, limit)
    except (ConfigError, JobError) as err:
        _fail(str(err))
    typer.echo(format_summary(summary, out))


@embed_app.command("classify")
def classify(
    embeddings: Annotated[Path, typer.Option("--embeddings", help="folder written by `ppd embed`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for classifier.json and top_k.png")],
    max_users: Annotated[int, typer.Option(help="users with the most groups to classify (paper: 300)")] = 300,
    test_per_user: Annotated[int, typer.Option(help="held-out groups per user")] = 1,
    model_id: Annotated[str | None, typer.Option(help="pick one model's embeddings in a mixed folder")] = None,
    pooling: Annotated[str, typer.Option(help="auto | flatten | mean (auto: mean for pairdiff tokens)")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the held-out split")] = 0,
) -> None:
    """Train a user classifier on frozen embeddings; report top-k accuracy (k = 1..16) against chance."""
    from ppd.embed.classify import evaluate_user_classifier, plot_top_k
    from ppd.embed.store import read_embeddings, read_rows

    if pooling not in ("auto", "flatten", "mean"):
        _fail(f"--pooling must be auto, flatten or mean, not {pooling!r}")
    try:
        vectors = read_embeddings(embeddings, model_id=model_id)
        settings = {json.loads(s)["embedder"] for s in read_rows(embeddings)["settings"].to_pylist()}
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if pooling == "auto":
        pooling = "mean" if settings == {"pairdiff"} else "flatten"
    logger.info(f"classifying users from {len(vectors)} embeddings ({pooling} pooling)")
    try:
        report = evaluate_user_classifier(
            vectors, pooling=pooling, max_users=max_users, test_per_user=test_per_user, seed=seed
        )
    except ValueError as err:
        _fail(str(err))
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier.json").write_text(report.to_json())
    plot_top_k(report, out / "top_k.png")
    typer.echo(f"{report.n_users} users, {report.train_groups} train / {report.test_groups} held-out groups")
    typer.echo(report.summary())
    typer.echo(f"-> {out}/classifier.json, {out}/top_k.png")
