"""`ppd embed ...`: user embeddings from few-shot groups (filled in by the Stage 1 work)."""

import typer

embed_app = typer.Typer(help="Stage 1: few-shot preference groups -> user embeddings; user classifier.")
