"""PPD: personalised preference fine-tuning of diffusion models (pure library: no ray, deepspeed or mlflow)."""

__version__ = "0.1.0"
