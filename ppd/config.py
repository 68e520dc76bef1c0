"""One typed config tree for every job, with named presets.

Presets are plain functions returning a validated `PPDConfig`; variants are derived with `model_copy(update=...)`
or dotted overrides (`train.lr=1e-4`). YAML/JSON is only a serialisation (job arguments, MLflow params).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ATTRIBUTES: tuple[str, ...] = ("brightness", "saturation", "centredness", "warmth", "size")


class _Section(BaseModel):
    # Unknown keys are mistakes (a typo in an override must not silently do nothing).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ToyWorldConfig(_Section):
    """Procedural preference data with synthetic users whose rewards are known (the embedded default)."""

    image_size: int = Field(32, ge=8, le=256, description="side of the square RGB images in pixels")
    one_reward_pairs_per_user: int = Field(400, ge=8, description="pairs labelled by each one-reward user")
    population_users: int = Field(240, ge=2, description="users with random mixed reward weights")
    population_pairs_per_user: int = Field(64, ge=4, description="pairs labelled by each population user")
    bt_temperature: float = Field(
        4.0, gt=0, description="Bradley-Terry rationality: p(A>B) = sigmoid(temp * (rA - rB))"
    )
    tie_margin: float = Field(0.02, ge=0, description="|rA - rB| below this (in reward std units) is labelled a tie")
    identical_pair_rate: float = Field(0.01, ge=0, le=0.5, description="share of pairs showing the same image twice")
    rows_per_file: int = Field(4096, ge=16, description="rows per parquet shard written under pairs/")


class DataConfig(_Section):
    """Preparation of Pick-a-Pic v2-schema preference data into splits and few-shot groups."""

    shots: int = Field(4, ge=1, le=16, description="pairs per few-shot group (paper: N = 4)")
    seed: int = Field(0, description="seed of every split and group assignment")
    validation_caption_fraction: float = Field(0.1, ge=0, lt=1, description="captions held out for validation")
    test_caption_fraction: float = Field(0.25, ge=0, lt=1, description="captions held out for test_seen/test_unseen")
    test_unseen_user_fraction: float = Field(0.2, ge=0, lt=1, description="users held out entirely (test_unseen)")
    check_images: bool = Field(
        True, description="decode every image during preparation (undecodable rows are rejected)"
    )
    concurrency: int = Field(2, ge=1, description="Ray Data tasks that read/validate shards in parallel")
    toy: ToyWorldConfig = Field(default_factory=ToyWorldConfig)

    @model_validator(mode="after")
    def _fractions_leave_training_captions(self) -> DataConfig:
        if self.validation_caption_fraction + self.test_caption_fraction >= 1:
            raise ValueError(
                "validation_caption_fraction + test_caption_fraction must be < 1 (no training captions left)"
            )
        return self


class ModelConfig(_Section):
    """Stage C base model and the decoupled user adapter."""

    architecture: Literal["tiny", "stage_c_lite", "stage_c"] = Field(
        "tiny", description="Stage C architecture: a tiny local one for CPU, or the real lite (1B) / full (3.6B) prior"
    )
    stage_c_path: str | None = Field(
        None, description="local path (or hub id on clusters) of pretrained Stage C weights; None = build locally"
    )
    cache_dir: str = Field(".cache/ppd/models", description="where locally built tiny models are saved and reloaded")
    user_tokens: int = Field(4, ge=1, le=64, description="user tokens T_u the embedding is projected to (>= 4 advised)")
    user_scale: float = Field(1.0, ge=0, description="scale s of the user branch at inference (0 = base model)")
    adapter_init: Literal["zero_value", "copy_text_kv"] = Field(
        "zero_value", description="init of W'_k, W'_v: zero value projection (starts equal to base) or copy of text K/V"
    )
    latent_size: int = Field(
        16, ge=1, description="Stage C latent side (16 for the toy world's 32 px; 24 for 1024 px on the real model)"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    weights_variant: Literal["bf16"] | None = Field(
        None,
        description="variant of the pretrained weight files to read (bf16: the *.bf16.safetensors files of the "
        "Stable Cascade repositories, half the download and no fp32 copy in memory); None = the default files",
    )
    effnet_path: str | None = Field(
        None,
        description="Stable Cascade's EfficientNet latent encoder (real architectures): a .safetensors file, a folder "
        "holding effnet_encoder.safetensors, or a hub repo id; None = stabilityai/stable-cascade",
    )
    decoder_path: str | None = Field(
        None,
        description="Stage B + Stage A weights (subfolders decoder/ and vqgan/) that decode real Stage C latents; "
        "None = stabilityai/stable-cascade for the real architectures (the tiny one decodes with the toy codec)",
    )
    decoder_steps: int = Field(10, ge=1, le=50, description="Stage B sampler steps when decoding (Stable Cascade: 10)")


class EmbedConfig(_Section):
    """Stage 1: users' few-shot groups -> user embeddings."""

    embedder: Literal["vlm-hf", "vlm-vllm", "pairdiff", "onehot"] = Field(
        "pairdiff", description="VLM (paper), pair differences of a frozen image encoder, or one-hot known users"
    )
    vlm_path: str | None = Field(None, description="LLaVA-OneVision checkpoint path; None = locally built tiny model")
    layers: Literal["last", "all"] | list[int] = Field("last", description="hidden-state layers kept in the embedding")
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the profile (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1, description="actors in the Ray Data pool")
    gpus_per_actor: float = Field(0.0, ge=0)
    seed: int = Field(0, description="sampling seed of the profiles (vLLM: seed + group_id per request)")
    forward_batch_size: int = Field(
        4, ge=1, description="rows per hidden-state forward pass (bounds the memory of all-layer states)"
    )
    image_encoder_path: str | None = Field(
        None, description="pairdiff: CLIP vision checkpoint (e.g. openai/clip-vit-large-patch14); None = tiny local"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="VLM weights (bfloat16 for the 7B on GPUs)")
    max_image_side: int | None = Field(
        None,
        ge=16,
        description="images are shrunk to at most this side before the VLM sees them (384 = one any-resolution tile "
        "of the 7B's tower: ~1.5k tokens per image in vLLM's layout instead of up to ~7k); None = as stored",
    )
    max_model_len: int | None = Field(
        None, ge=256, description="vLLM context (prompt + profile tokens); a longer prompt is an error row, not a crash"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=0.98,
        description="share of the GPU vLLM may take (weights + KV cache); the transformers copy of the same model for "
        "the hidden-state pass needs the rest (0.55 for the 7B in bf16 beside it on an 80 GB GPU)",
    )


class TrainConfig(_Section):
    """Stage 2: user-conditioned Diffusion-DPO fine-tuning of the adapter."""

    method: Literal["ppd", "dpo", "sft"] = "ppd"
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (paper: 1e-5 synthetic users, 3e-6 real users)")
    # Tried at 10 on the toy world (tiny_cpu): lower validation reward, fewer objects (docs/results_investigation.md).
    user_projection_lr_scale: float = Field(
        1.0, gt=0, description="the user-token projection's learning rate is lr times this (W'_k, W'_v: lr)"
    )
    weight_decay: float = Field(0.0, ge=0)
    beta: float = Field(2.0, gt=0, description="DPO beta; beta * timesteps plays the role of Diffusion-DPO's beta_dpo")
    timesteps: int = Field(1000, ge=1, description="T in -log sigmoid(-beta * T * w * delta)")
    user_dropout: float = Field(0.1, ge=0, le=1, description="probability a pair's user embedding is zeroed")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    micro_batch: int = Field(16, ge=1, description="pairs per worker per forward")
    effective_batch: int = Field(768, ge=1, description="pairs per optimiser step over all workers")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (overrides epochs)")
    zero_stage: Literal[1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(100, ge=1, description="optimiser steps between checkpoints")
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    users: list[int] | None = Field(
        None, description="train only on pairs of these user ids (e.g. a per-reward DPO upper bound); None = all"
    )
    upper_bound_steps: int = Field(200, ge=1, description="optimiser steps of each per-reward DPO upper bound (demo)")
    upper_bound_rewards: list[str] | None = Field(
        None, description="rewards whose per-reward DPO upper bound the demo trains (one run each); None = all five"
    )
    concurrent_runs: int = Field(
        1,
        ge=1,
        description="independent training runs the demo and the β sweep submit at once (each reserves its workers' "
        "CPUs/GPUs; a 2-CPU box with 1-thread workers: 2)",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = no clipping)")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per training worker; leave some free for Ray Data (2-CPU box: 0.5)"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="how training workers are placed on nodes (PACK keeps them close, SPREAD over nodes)"
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="latest checkpoints kept in storage")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared filesystem or s3://) for checkpoints; None = <run dir>/ray"
    )
    precompute_batch_size: int = Field(64, ge=1, description="pairs / captions per encoder call in the precompute job")
    precompute_concurrency: int = Field(1, ge=1, description="encoder actors of the precompute job")
    precompute_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per precompute encoder actor")

    @property
    def grad_accumulation(self) -> int:
        """Accumulation steps so that workers x micro-batch x accumulation = effective batch."""
        return self.effective_batch // (self.num_workers * self.micro_batch)

    @field_validator("upper_bound_rewards")
    @classmethod
    def _known_rewards(cls, rewards: list[str] | None) -> list[str] | None:
        unknown = sorted(set(rewards or ()) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown reward(s) {', '.join(unknown)} (known: {', '.join(ATTRIBUTES)})")
        return rewards

    @model_validator(mode="after")
    def _effective_batch_divides(self) -> TrainConfig:
        per_step = self.num_workers * self.micro_batch
        if self.effective_batch % per_step:
            raise ValueError(
                f"effective_batch={self.effective_batch} is not a multiple of num_workers x micro_batch = {per_step}"
            )
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision=bf16 needs use_gpu=true (CPU training runs in fp32)")
        return self


class EvalConfig(_Section):
    """Evaluation: generation, rewards, win rates, judge."""

    captions: int = Field(16, ge=1, description="evaluation captions per user")
    seeds_per_caption: int = Field(2, ge=1)
    users_per_split: int = Field(48, ge=1, description="population users evaluated per test split")
    captions_per_user: int = Field(4, ge=1, description="held-out captions generated per population user")
    concurrency: int = Field(1, ge=1, description="generator actors in the Ray Data pool")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per generator actor (the generator runs on its GPU)")
    batch_size: int = Field(64, ge=1, description="generation requests per actor call")
    inference_steps: int = Field(30, ge=1, description="sampler steps (paper: 30)")
    guidance: float = Field(4.0, ge=0, description="classifier-free guidance scale on text")
    bootstrap_samples: int = Field(1000, ge=100)
    judge: Literal["oracle", "openai", "none"] = Field(
        "oracle",
        description="toy world: oracle; real data: openai (a VLM behind an OpenAI-compatible endpoint) or none",
    )
    judge_base_url: str | None = Field(None, description="OpenAI-compatible server root (…/v1/chat/completions)")
    judge_max_image_side: int | None = Field(
        None,
        ge=16,
        description="images are shrunk to at most this side before the judge sees them (10 images per question: "
        "at 384 px each is one any-resolution tile of LLaVA-OneVision, ~1.5k tokens); None = as generated",
    )
    judge_model: str | None = None
    judge_api_key_env: str = Field(
        "OPENAI_API_KEY", description="env var holding the judge endpoint's API key (unset = no auth header)"
    )
    judge_pairs: int = Field(200, ge=1, description="held-out pairs the judge is scored on (paper B.3)")
    judge_temperature: float = Field(1.0, ge=0, description="judge sampling temperature (paper B.3: 1.0)")
    judge_top_p: float = Field(1.0, gt=0, le=1, description="judge nucleus sampling (paper B.3: 1.0 = none)")
    judge_chain_of_thought: bool = Field(
        True, description="describe, contrast and profile before predicting (paper B.3, Table 2)"
    )
    judge_max_tokens: int = Field(1024, ge=1, description="reply length the judge may use (reasoning + verdict)")
    judge_split: Literal["test_seen", "test_unseen"] = Field(
        "test_unseen", description="split whose held-out pairs (and users) the judge is scored on"
    )
    image_rewards: tuple[Literal["pickscore", "clip_score", "aesthetic", "hps"], ...] = Field(
        ("clip_score", "aesthetic", "hps"), description="real-image rewards loaded by load_image_rewards"
    )
    selection_reward: Literal["pickscore", "clip_score", "aesthetic", "hps"] = Field(
        "pickscore", description="reward that picks the best adapter (e.g. the beta) on the validation split (paper)"
    )
    reward_batch_size: int = Field(32, ge=1, description="images per reward-model forward")
    clip_score_path: str | None = Field(
        None,
        description="CLIPModel folder (safetensors) for the CLIP score, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K; "
        "None = tiny local CLIP with random weights",
    )
    aesthetic_clip_path: str | None = Field(
        None,
        description="CLIP ViT-L/14 folder under the aesthetic head (openai/clip-vit-large-patch14); None = tiny CLIP",
    )
    aesthetic_head_path: str | None = Field(
        None,
        description="LAION sac+logos+ava1-l14-linearMSE head converted to .safetensors; None = the tiny CLIP's head",
    )
    hps_path: str | None = Field(
        None, description="HPSv2 (OpenCLIP ViT-H/14) converted to a CLIPModel folder; None = tiny local CLIP"
    )
    pickscore_path: str | None = Field(
        None, description="PickScore CLIPModel (yuvalkirstain/PickScore_v1, safetensors); None = tiny local CLIP"
    )
    pickscore_processor_path: str | None = Field(
        None,
        description="tokenizer + image processor of PickScore (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); "
        "None = the PickScore folder's own",
    )


class ServeLimits(_Section):
    """What one HTTP request may ask for; anything beyond is a 4xx naming the field, never a 5xx."""

    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="request body cap in bytes (413 beyond)")
    max_image_bytes: int = Field(256 * 2**10, ge=64, description="one decoded image's bytes (413 beyond)")
    max_image_pixels: int = Field(
        1024 * 1024, ge=1, description="width x height of one image (checked before decoding)"
    )
    max_caption_chars: int = Field(300, ge=1, description="caption length in characters after stripping")
    max_steps: int = Field(50, ge=1, description="sampler steps per request")
    max_images: int = Field(4, ge=1, description="images per request")
    max_guidance: float = Field(20.0, gt=0, description="text guidance scale")
    max_user_scale: float = Field(4.0, gt=0, description="user scale s")
    max_mix_users: int = Field(8, ge=2, description="users in one weighted mix")
    max_example_pairs: int = Field(16, ge=1, description="example pairs per GET /v1/example-pairs")


class AutoscalingSpec(_Section):
    """Serve autoscaling of one deployment (replaces a fixed replica count)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica the autoscaler aims for")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


class DeploymentSpec(_Section):
    """Replicas and resources of one Serve deployment (the Serve config and the RayService read these)."""

    replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica")
    gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica")
    max_ongoing_requests: int = Field(16, ge=1, description="requests one replica works on at once")
    max_queued_requests: int = Field(
        -1, ge=-1, description="requests a caller may queue for this deployment before 503 (-1 = unbounded)"
    )
    autoscaling: AutoscalingSpec | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments of Serve's `Deployment.options` (kept here so every entry point applies the same)."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options


class ServeConfig(_Section):
    """Ray Serve application: Ingress (HTTP) -> Embedder -> Generator, plus the single-replica user store.

    The HTTP bind address is Serve's (`http_options` in ppd_ray/serving/config.yaml); the ingress reads it at start-up to
    decide whether auth is on (`auth: auto`).
    """

    adapter_dir: str = Field(
        "runs/demo/runs/ppd_population/adapter",
        description="adapter checkpoint served (safetensors + JSON); `ppd demo` writes it",
    )
    example_pairs_dir: str = Field(
        "runs/demo/prepared/population/validation",
        description="a prepared split (Pick-a-Pic v2 parquet) the web page draws example pairs from; "
        "`ppd demo` writes this one (a missing folder: the page asks for uploads instead)",
    )
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="bearer-token auth; auto = on when Serve's HTTP proxy binds a non-loopback address"
    )
    auth_token_env: str = Field("PPD_API_TOKEN", description="env var (on the ingress replicas) holding the token")
    max_batch_size: int = Field(8, ge=1, description="generation requests of different users per sampler call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    request_timeout_s: float = Field(
        120.0, gt=0, description="the ingress gives up on a downstream call after this (504), so no request hangs"
    )
    max_users: int = Field(100_000, ge=1, description="user handles kept in memory (oldest dropped beyond)")
    embedding_cache_size: int = Field(4096, ge=0, description="embeddings cached per Embedder replica (LRU)")
    limits: ServeLimits = Field(default_factory=ServeLimits)
    ingress: DeploymentSpec = Field(default_factory=lambda: DeploymentSpec(cpus=0.25, max_ongoing_requests=64))
    embedder: DeploymentSpec = Field(default_factory=lambda: DeploymentSpec(cpus=0.25, max_ongoing_requests=16))
    generator: DeploymentSpec = Field(default_factory=lambda: DeploymentSpec(cpus=0.5, max_ongoing_requests=32))

    @field_validator("auth", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads a bare on/off (as in `--set serve.auth=off`) as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        # Serve never hands a replica more than max_ongoing_requests at once: at or below the batch size, batches
        # never fill (they run at the timeout with what arrived).
        if self.generator.max_ongoing_requests <= self.max_batch_size:
            raise ValueError(
                f"generator.max_ongoing_requests={self.generator.max_ongoing_requests} must exceed "
                f"max_batch_size={self.max_batch_size}, or batches never fill"
            )
        return self


class TrackingConfig(_Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="MLflow tracking URI; None = start a local server on loopback")
    experiment: str = "ppd"
    local_store: str = Field(
        "runs/mlflow", description="sqlite store + artifacts of the loopback server started when uri is None"
    )
    registered_model: str = Field("ppd-user-adapter", description="registered model each trained adapter is added to")
    sample_captions: int = Field(3, ge=1, le=8, description="captions in the sample grid logged after training")
    sample_users: int = Field(3, ge=1, le=8, description="users in the sample grid logged after training")
    parent_run_id: str | None = Field(
        None, description="MLflow run this job's run is nested under (e.g. the parent run of a β sweep)"
    )


class PPDConfig(_Section):
    """The whole configuration of a PPD run."""

    preset: str = "custom"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PPDConfig:
        return cls.model_validate(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> PPDConfig:
        """Load a YAML or JSON file written by `to_yaml` / `to_json`."""
        text = Path(path).read_text()
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(raw)

    def flatten(self) -> dict[str, str]:
        """Dotted key -> string value, e.g. for MLflow params."""
        return {
            key: json.dumps(value) if isinstance(value, list) else str(value)
            for key, value in flatten_tree(self.to_dict())
        }

    def with_overrides(self, overrides: Iterable[str]) -> PPDConfig:
        """Apply `section.field=value` overrides (values parsed as YAML scalars) and re-validate."""
        raw = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.field=value")
            dotted, value_text = item.split("=", 1)
            node = raw
            *parents, leaf = dotted.strip().split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {dotted!r}: no config section {part!r}")
                node = node[part]
            if leaf not in node:
                raise ConfigError(f"override {dotted!r}: unknown field {leaf!r} (known: {', '.join(sorted(node))})")
            node[leaf] = yaml.safe_load(value_text)
        try:
            return PPDConfig.from_dict(raw)
        except ValidationError as err:
            raise ConfigError(_explain(err)) from None


class ConfigError(ValueError):
    """A user-facing configuration mistake (bad preset, override or file)."""


def flatten_tree(tree: dict[str, Any], prefix: str = "", index_lists: bool = False) -> Iterable[tuple[str, Any]]:
    """(dotted key, leaf) of a nested dict; with `index_lists`, list items are leaves too (`ci95.0`, `ci95.1`)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if index_lists and isinstance(value, list | tuple):
            value = {str(i): item for i, item in enumerate(value)}
        if isinstance(value, dict):
            yield from flatten_tree(value, dotted + ".", index_lists)
        else:
            yield dotted, value


def _explain(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())


# --- presets ---------------------------------------------------------------------------------------------------------


def tiny_cpu() -> PPDConfig:
    """The embedded default: toy world, tiny models, local Ray on a 2-core CPU box."""
    return PPDConfig(
        preset="tiny_cpu",
        data=DataConfig(),
        model=ModelConfig(architecture="tiny", latent_size=16),
        embed=EmbedConfig(embedder="pairdiff", max_new_tokens=48, batch_size=8),
        train=TrainConfig(
            lr=5e-4,
            beta=2.0,
            num_workers=1,
            micro_batch=32,
            effective_batch=32,
            max_steps=400,
            checkpoint_every=200,
            # Each upper bound trains on one user's training pairs (~240 of its 400 after the splits): 60 steps of 32
            # pairs are ~8 epochs, below the 80 steps' worth of that user's pairs that PPD's 400 steps over 5 users
            # see; 120 kept the demo over 30 min.
            upper_bound_steps=60,
            cpus_per_worker=0.5,  # 2-CPU box: leave a core to Ray Data's readers, or the input pipeline stalls
            # A 0.5-CPU worker computes on one thread: two runs at once use both cores (each run stays deterministic).
            concurrent_runs=2,
        ),
        # Two generator actors of one thread each use both cores (one actor used one: the evaluation took 9 min).
        eval=EvalConfig(inference_steps=20, concurrency=2),
    )


def smoke() -> PPDConfig:
    """A minutes-long reduction of `tiny_cpu` for tests: few users, few pairs, few steps."""
    return tiny_cpu().with_overrides(
        [
            "preset=smoke",
            "data.toy.one_reward_pairs_per_user=40",
            "data.toy.population_users=24",
            "data.toy.population_pairs_per_user=32",
            # PPD must learn the brightness user's taste even here (the demo test checks it). Steps, not pairs, are
            # what it takes, measured on the shipped base (8 images): 80 steps of 4 pairs -> 8 of 8 brighter than the
            # base's, in less time than 80 of 8; 40 of 8 -> 6 of 8 (also at twice the lr); 10 of 8 -> no better than
            # chance.
            "train.micro_batch=4",
            "train.effective_batch=4",
            "train.max_steps=80",
            "train.upper_bound_steps=3",
            # One upper bound (each is a training job of ~40 s, mostly start-up): the demo test's time goes on what it
            # checks; the full demo trains all five.
            "train.upper_bound_rewards=[brightness]",
            "train.cpus_per_worker=0.5",
            "eval.captions=4",  # 4 images per one-reward user: enough for the demo test's brightness check
            "eval.users_per_split=4",
            "eval.captions_per_user=2",
            "eval.bootstrap_samples=200",
            "eval.seeds_per_caption=1",
            "eval.inference_steps=4",
            "eval.concurrency=1",  # a few images: a second actor would spend longer loading the models
        ]
    )


# The HF-format LLaVA-OneVision 7B chat model (the authors' `lmms-lab/llava-onevision-qwen2-7b-ov-chat` converted by
# llava-hf; the lmms-lab repository's model_type `llava_qwen` is not loadable by transformers or vLLM).
LLAVA_ONEVISION_7B = "llava-hf/llava-onevision-qwen2-7b-ov-chat-hf"


def llava_onevision_7b_vllm(actors: int = 8) -> EmbedConfig:
    """The paper's embedder at scale: LLaVA-OneVision 7B (chat) on vLLM in bf16, one H100 per actor, final-token
    states of all 29 layers (embeddings + 28) = [29, 3584] per few-shot group.

    vLLM and the transformers copy for the hidden-state pass share each GPU (55% for vLLM's weights and KV cache,
    the rest for the 15 GiB bf16 copy and its forward); images are shrunk to 384 px, one any-resolution tile of the
    tower, so 8 images (~1.5k tokens each in vLLM's layout) + prompt + a 1024-token profile fit a 16k context.
    """
    return EmbedConfig(
        embedder="vlm-vllm",
        vlm_path=LLAVA_ONEVISION_7B,
        layers="all",
        max_new_tokens=1024,
        batch_size=32,
        concurrency=actors,
        gpus_per_actor=1.0,
        dtype="bfloat16",
        forward_batch_size=4,
        max_image_side=384,
        max_model_len=16384,
        vllm_gpu_memory_utilization=0.55,
    )


# Weights that must be converted once before a run (safetensors only: no pickle is ever loaded), on the shared volume.
CLUSTER_WEIGHTS_DIR = "/mnt/shared/weights"


def real_image_rewards() -> EvalConfig:
    """Evaluation on real images: PickScore (the paper's validation metric for beta), CLIP score (OpenCLIP ViT-H/14),
    LAION aesthetic (CLIP ViT-L/14 + the converted MLP head) and HPSv2 (converted to a CLIPModel folder), the VLM
    judge behind an OpenAI-compatible endpoint (cluster/judge.yaml), one GPU per generator actor."""
    return EvalConfig(
        image_rewards=("pickscore", "clip_score", "aesthetic", "hps"),
        selection_reward="pickscore",
        pickscore_path="yuvalkirstain/PickScore_v1",
        pickscore_processor_path="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        clip_score_path="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        aesthetic_clip_path="openai/clip-vit-large-patch14",
        aesthetic_head_path=f"{CLUSTER_WEIGHTS_DIR}/aesthetic/aesthetic_head.safetensors",
        hps_path=f"{CLUSTER_WEIGHTS_DIR}/hpsv2_clip",
        judge="openai",
        judge_base_url="http://ppd-judge.ppd.svc.cluster.local:8000",
        judge_max_image_side=384,
        judge_model=LLAVA_ONEVISION_7B,
        users_per_split=200,
        captions_per_user=4,
        seeds_per_caption=1,
        inference_steps=30,
        batch_size=16,
        concurrency=8,
        gpus_per_actor=1.0,
    )


def stage_c_lite_h100x8() -> PPDConfig:
    """Paper setting: Stable Cascade lite Stage C, 8 x H100 (one node), micro-batch 16, effective batch 768, bf16."""
    return PPDConfig(
        preset="stage_c_lite_h100x8",
        data=DataConfig(check_images=True, concurrency=32),
        model=ModelConfig(
            architecture="stage_c_lite",
            stage_c_path="stabilityai/stable-cascade-prior",
            latent_size=24,
            dtype="bfloat16",
            weights_variant="bf16",
        ),
        embed=llava_onevision_7b_vllm(actors=8),
        train=TrainConfig(
            lr=3e-6,
            num_workers=8,
            use_gpu=True,
            micro_batch=16,
            effective_batch=768,
            epochs=1.0,
            precision="bf16",
            # Latents and caption states on GPU actors (EfficientNet + CLIP ViT-bigG in bf16), one per GPU.
            precompute_batch_size=64,
            precompute_concurrency=8,
            precompute_gpus_per_actor=1.0,
        ),
        eval=real_image_rewards(),
        # Served from this preset too: the generator and the VLM embedder each on a GPU of their own.
        serve=ServeConfig(
            embedder=DeploymentSpec(cpus=4, gpus=1, max_ongoing_requests=16),
            generator=DeploymentSpec(cpus=4, gpus=1, max_ongoing_requests=32),
        ),
        tracking=TrackingConfig(uri="http://mlflow.ppd.svc.cluster.local:5000"),
    )


def stage_c_h100x8() -> PPDConfig:
    """The full 3.6B Stage C on 8 x H100: the lite recipe at micro-batch 8 x accumulation 12 (fits 80 GB)."""
    # Micro-batch 8 x accumulation 12: at 16 the 3.6B's activations alone (~73 GiB, `ppd model plan`) overflow an
    # 80 GB H100 under ZeRO-2, and the adapter cannot use gradient checkpointing.
    return stage_c_lite_h100x8().with_overrides(
        ["preset=stage_c_h100x8", "model.architecture=stage_c", "train.micro_batch=8"]
    )


def _two_nodes(cfg: PPDConfig, preset: str) -> PPDConfig:
    # 2 nodes x 8 H100 (cluster/raycluster.yaml): twice the workers and actors, half the accumulation (same 768).
    return cfg.with_overrides(
        [
            f"preset={preset}",
            "train.num_workers=16",
            "train.precompute_concurrency=16",
            "embed.concurrency=16",
            "eval.concurrency=16",
        ]
    )


def stage_c_lite_h100x16() -> PPDConfig:
    """The paper setting on 2 nodes x 8 H100 (the cluster of cluster/): 16 workers x 16 x accumulation 3 = 768."""
    return _two_nodes(stage_c_lite_h100x8(), "stage_c_lite_h100x16")


def stage_c_h100x16() -> PPDConfig:
    """The 3.6B Stage C on 2 nodes x 8 H100: 16 workers x micro-batch 8 x accumulation 6 = 768."""
    return _two_nodes(stage_c_h100x8(), "stage_c_h100x16")


def llava_ov7b_vllm_h100x8() -> PPDConfig:
    """Stage 1 on 8 x H100: LLaVA-OneVision 7B on vLLM, bf16, one GPU per actor (the lite preset's embed section)."""
    return stage_c_lite_h100x8().with_overrides(["preset=llava_ov7b_vllm_h100x8"])


def llava_ov7b_vllm_h100x16() -> PPDConfig:
    """Stage 1 on 2 nodes x 8 H100: 16 vLLM actors (the 16-GPU lite preset's embed section)."""
    return stage_c_lite_h100x16().with_overrides(["preset=llava_ov7b_vllm_h100x16"])


# Where the train job of the cluster writes its run (cluster/jobs/train.yaml: --out); the adapter is under it.
CLUSTER_RUN_DIR = "/mnt/shared/runs/ppd"
# Where the cluster's prepare job writes its splits (cluster/jobs/prepare.yaml: --out); the page's examples are there.
CLUSTER_PREPARED_DIR = "/mnt/shared/runs/prepared"


def serve_lite_h100() -> PPDConfig:
    """Ray Serve on H100s: lite Stage C + the trained adapter, one GPU per generator / VLM embedder replica.

    The adapter is the cluster train job's output on shared storage; batches of up to 16 users; generators
    autoscale from 1 to 4 replicas.
    """
    return stage_c_lite_h100x8().with_overrides(
        [
            "preset=serve_lite_h100",
            f"serve.adapter_dir={CLUSTER_RUN_DIR}/adapter",
            f"serve.example_pairs_dir={CLUSTER_PREPARED_DIR}/validation",
            "serve.auth='on'",
            "serve.max_batch_size=16",
            "serve.generator.max_ongoing_requests=64",
            "serve.generator.autoscaling={min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}",
        ]
    )


PRESETS: dict[str, Callable[[], PPDConfig]] = {
    "tiny_cpu": tiny_cpu,
    "smoke": smoke,
    "stage_c_lite_h100x8": stage_c_lite_h100x8,
    "stage_c_h100x8": stage_c_h100x8,
    "stage_c_lite_h100x16": stage_c_lite_h100x16,
    "stage_c_h100x16": stage_c_h100x16,
    "llava_ov7b_vllm_h100x8": llava_ov7b_vllm_h100x8,
    "llava_ov7b_vllm_h100x16": llava_ov7b_vllm_h100x16,
    "serve_lite_h100": serve_lite_h100,
}


def cluster_presets() -> list[str]:
    """Presets of the real architectures (what `ppd check-real` checks and the cluster manifests name)."""
    return [name for name, factory in PRESETS.items() if factory().model.architecture != "tiny"]


def load_config(
    preset: str = "tiny_cpu", overrides: Iterable[str] = (), config_file: str | Path | None = None
) -> PPDConfig:
    """Build a config from a named preset (or a file), then apply dotted overrides."""
    if config_file is not None:
        cfg = PPDConfig.from_file(config_file)
    elif preset in PRESETS:
        cfg = PRESETS[preset]()
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return cfg.with_overrides(overrides)
