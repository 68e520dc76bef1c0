"""`ppd model ...`: model inspection commands (filled in by the model-core work)."""

import typer

model_app = typer.Typer(help="Inspect Stage C architectures and the user adapter.", no_args_is_help=True)
