"""The Serve application: Ingress (FastAPI) -> Embedder -> Generator, plus the single-replica user store.

    serve run ppd_ray/serving/config.yaml                     # import_path ppd_ray.serving.app:build_app, args {preset, overrides}
    ppd serve --set serve.adapter_dir=runs/x/ppd    # the same file, with overrides

Replicas, CPUs/GPUs, autoscaling and batching come from the typed `serve` section of the PPD config
(`serve.generator.replicas=2`, ...), so `serve run`, `ppd serve` and a RayService running the same YAML all deploy
the same thing from one source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from ppd.config import PPDConfig, load_config
from ppd_ray.serving.embedder import EmbedderDeployment
from ppd_ray.serving.generator import GeneratorDeployment, resolve_adapter
from ppd_ray.serving.ingress import Ingress
from ppd_ray.serving.store import UserStoreDeployment


class AppArgs(BaseModel):
    """`args` of the Serve config: which PPD config to serve."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("tiny_cpu", description="a named preset of ppd.config")
    config_file: str | None = Field(None, description="a YAML/JSON PPD config instead of the preset")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides, e.g. serve.adapter_dir=...")

    def config(self) -> PPDConfig:
        return load_config(self.preset, self.overrides, self.config_file)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (`import_path: ppd_ray.serving.app:build_app`)."""
    return compose(AppArgs.model_validate(args or {}).config())


def compose(cfg: PPDConfig, runtime_env: dict | None = None) -> Application:
    """The bound application for `cfg`; `runtime_env` (e.g. env_vars) is added to every replica."""
    adapter_dir, _ = resolve_adapter(cfg)  # fail here, with what to do, rather than in a replica's constructor
    # Replicas may start in another working directory: pass the adapter and the example split as absolute paths.
    absolute = {
        "adapter_dir": str(Path(adapter_dir)),
        "example_pairs_dir": str(Path(cfg.serve.example_pairs_dir).expanduser().resolve()),
    }
    served = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=absolute)}).to_dict()
    serve_cfg = cfg.serve

    def options(spec_options: dict) -> dict:
        if runtime_env:
            spec_options["ray_actor_options"] = {**spec_options["ray_actor_options"], "runtime_env": runtime_env}
        return spec_options

    store = UserStoreDeployment.options(**options({"ray_actor_options": {"num_cpus": 0}})).bind(serve_cfg.max_users)
    embedder = EmbedderDeployment.options(**options(serve_cfg.embedder.options())).bind(served)
    generator = GeneratorDeployment.options(
        **options(serve_cfg.generator.options()),
        # Batching is live-tunable: a new user_config reconfigures the replicas without reloading the model.
        user_config={
            "max_batch_size": serve_cfg.max_batch_size,
            "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s,
        },
    ).bind(served)
    return Ingress.options(**options(serve_cfg.ingress.options())).bind(served, embedder, generator, store)
