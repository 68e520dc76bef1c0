"""`ppd serve`: run the Serve application of ppd_ray/serving/config.yaml (what `serve run ppd_ray/serving/config.yaml` runs), with overrides.

The Serve config file stays the one source: its `http_options` (bind address), its application's `import_path`
and `args`; `--set` adds PPD config overrides to `args.overrides`, `--host/--port` replace the bind address.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from ppd.config import ConfigError

DEFAULT_SERVE_CONFIG = Path("ppd_ray/serving/config.yaml")


def serve_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Serve config YAML")] = DEFAULT_SERVE_CONFIG,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="PPD config override, e.g. --set serve.adapter_dir=runs/x/ppd (repeatable)"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default: the file's http_options.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: the file's http_options.port)")] = None,
    check: Annotated[bool, typer.Option("--check", help="validate the config and the adapter, then exit")] = False,
) -> None:
    """Serve the PPD app over HTTP: the web page at /, the API (POST /v1/users, /v1/generate, ...; OpenAPI at /docs)."""
    from ray.serve.schema import ServeDeploySchema

    from ppd_ray.serving.app import AppArgs
    from ppd_ray.serving.generator import resolve_adapter

    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text()))
    except (OSError, ValueError) as err:
        _fail(f"{config}: not a Serve config: {err}")
    if len(schema.applications) != 1 or schema.applications[0].import_path != "ppd_ray.serving.app:build_app":
        _fail(f"{config}: expected one application with import_path ppd_ray.serving.app:build_app")
    application = schema.applications[0]
    if application.deployments:
        _fail(f"{config}: set replicas and resources with serve.* overrides in args, not under deployments:")
    args = AppArgs.model_validate(application.args or {})
    args = args.model_copy(update={"overrides": [*args.overrides, *(overrides or [])]})
    try:
        cfg = args.config()
        adapter_dir, meta = resolve_adapter(cfg)
    except (ConfigError, OSError, ValueError) as err:
        _fail(str(err))
    http_options = schema.http_options.model_dump()
    http_options.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    typer.echo(
        f"serving {adapter_dir} ({meta.train_method}, base {meta.base_model}) with embedder {cfg.embed.embedder} "
        f"on http://{http_options['host']}:{http_options['port']}/ (the web page; OpenAPI: /docs)"
    )
    if check:
        return

    from ray import serve

    from ppd_ray.console import JobError
    from ppd_ray.infra.ray_auth import start_or_connect
    from ppd_ray.serving.app import build_app

    try:
        start_or_connect(namespace="serve")  # RAY_ADDRESS with your token, else a local Ray with a private one
    except JobError as err:
        _fail(str(err))
    serve.start(http_options=http_options, proxy_location=schema.proxy_location)
    serve.run(build_app(args.model_dump()), name=application.name, route_prefix=application.route_prefix, blocking=True)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)
