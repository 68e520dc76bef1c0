"""What the `ppd` commands share: the preset and override options, loading the config, the one-line error."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from ppd.config import PRESETS, ConfigError, PPDConfig, load_config

PresetOption = Annotated[str, typer.Option("--preset", "-p", help=f"config preset: {', '.join(PRESETS)}")]
OverrideOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
]


def fail(message: str) -> NoReturn:
    """A user mistake: one red line on stderr, exit status 2."""
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def config_or_fail(preset: str, overrides: list[str] | None, extra: list[str] = ()) -> PPDConfig:
    """The validated config of `preset` with `overrides` then `extra`; a mistake in them is a one-line error."""
    try:
        return load_config(preset, [*(overrides or []), *extra])
    except ConfigError as err:
        fail(str(err))
