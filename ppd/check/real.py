"""`ppd check-real`: does every job of a cluster preset run on the real checkpoints' layouts? Checked on a CPU.

Nothing is downloaded. The real architectures are either built on the meta device at full size (shapes, parameter
counts, key names, FLOPs and memory of a training step) or at **reduced depth** (the same classes, widths, heads,
vocabulary layouts and config keys, fewer layers, random weights), saved in the real repositories' folder layouts and
file names (bf16 variants, safetensors) and loaded back through the project's own loaders. One batch then goes
through each job's code path, in the preset's dtype:

    config      the preset itself: workers x micro-batch x accumulation, GPU actors, the VLM checkpoint, vLLM's
                context and memory budget on one GPU beside the transformers copy
    stage C     the preset's Stage C config == the public checkpoint's, key by key; full size on meta; the adapter
                (W'_k + W'_v); one training micro-step traced on meta (FLOPs, memory per GPU: must fit)
    precompute  EfficientNet (full size) on a pair of JPEGs -> latents [16, 24, 24] stored in the model's dtype;
                CLIP ViT-bigG (reduced) -> caption states; the precomputed layout written and read back
    embed       LLaVA-OneVision 7B config on meta -> [29, 3584]; reduced, one group: profile + final-token states,
                in the multi-image layout and in vLLM's any-resolution layout at the preset's image side
    train       the training step (PPD loss) + backward on the reduced Stage C: finite loss, adapter-only gradients
    sample      the sampler with text guidance against the encoded empty caption
    serve       the Serve generator's code path (Stage C + adapter checkpoint + Stage B + Stage A) -> PNGs
                (train, sample and serve on 6 x 6 Stage C latents: CHECK_LATENT_SIDE says why)
    evaluate    every configured image reward on those images

What is reduced is printed with each line. The Serve step is passed in by the caller (`ppd_ray/serving/` imports Ray, which
`ppd` never does); without it the evaluation generator (`VariantGenerator`) stands in.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ppd.check.reduced import (
    REDUCED_LAYERS,
    decoder_repository,
    reward_directories,
    stage_c_repository,
    vlm_directory,
)
from ppd.config import PPDConfig
from ppd.models.codec import STAGE_C_TO_STAGE_B_SCALE
from ppd.models.reference import (
    STAGE_A_VQGAN,
    STAGE_C_PRIOR,
    STAGE_C_SUBFOLDER,
    llava_onevision_7b_config,
    normalised,
)
from ppd.train.sizing import H100

STAGES = ("config", "stage_c", "precompute", "embed", "train", "sample", "serve", "evaluate")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Reductions of the batch run (the meta-device checks are at full size).
VLM_CHECK_SHOTS = 1  # pairs in the VLM's group: every image takes the same token layout, so one pair shows it
VLM_CHECK_TOKENS = 2  # generated tokens
SAMPLER_STEPS = 2
# The training step, the sampler and the Serve chain run on Stage C latents of 6 x 6 instead of the real 24 x 24 (the
# precompute check encodes at the real size): every weight, width, layer and dtype is the real one, and a spatial size
# changes none of them. Why: on a CPU without native bf16 arithmetic (AVX2; oneDNN's bf16 needs AVX-512) torch takes a
# reference GEMM for bf16 (~1 GFLOP/s on the backward's layout, against ~75 in float32), and the real size made one
# training step of the lite Stage C take 9 minutes. The full-size step is traced on the meta device (stage_c).
CHECK_LATENT_SIDE = 6  # -> Stage B 64 x 64 -> images of 256 px (1024 px at the real 24)
STAGE_B_STEPS = 1  # the preset decodes with model.decoder_steps (10); one step runs the same code
# A long Pick-a-Pic caption (the serve limit) and a conservative 3 characters per token for the prompt's text.
LONG_CAPTION_CHARS = 300
CHARS_PER_TOKEN = 3


class CheckFailed(Exception):
    """A mismatch between a preset and the real checkpoints' layouts: one line saying what and where."""


@dataclass
class CheckLine:
    stage: str
    status: str  # ok | FAIL | skipped
    detail: str
    seconds: float = 0.0


@dataclass
class CheckReport:
    preset: str
    lines: list[CheckLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(line.status != "FAIL" for line in self.lines)

    def format(self) -> str:
        rows = [f"check-real {self.preset}: {'passed' if self.ok else 'FAILED'}"]
        for line in self.lines:
            rows.append(f"  [{line.status:>7}] {line.stage:<10} {line.seconds:6.1f}s  {line.detail}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "ok": self.ok, "lines": [vars(line) for line in self.lines]}


ServeGenerate = Callable[[PPDConfig, Sequence[dict]], list[list[bytes]]]


def check_real(
    cfg: PPDConfig,
    workdir: Path,
    stages: Sequence[str] = STAGES,
    serve_generate: ServeGenerate | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> CheckReport:
    """Run the checks of `stages` for `cfg` (a cluster preset); reduced checkpoints are built under `workdir` once."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown check stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if cfg.model.architecture == "tiny":
        raise CheckFailed(f"preset {cfg.preset} uses the tiny architecture: check-real is for the real ones")
    run = _Run(cfg, Path(workdir), serve_generate or _variant_generator_serve, progress)
    report = CheckReport(cfg.preset)
    needs = {"train": "precompute", "sample": "train", "serve": "train", "evaluate": "serve"}
    for stage in STAGES:
        if stage not in stages:
            continue
        key = (stage, _memo_key(cfg, stage, tuple(stages)))
        if key in _DONE:  # another preset with the same models and settings ran this batch in this process
            line, first = _DONE[key]
            run.passed.add(stage)
            report.lines.append(CheckLine(stage, "ok", f"as for {first} (same models and settings): {line}", 0.0))
            continue
        if stage in needs and needs[stage] not in run.passed:
            report.lines.append(CheckLine(stage, "skipped", f"needs the {needs[stage]} check to pass first"))
            continue
        progress(f"check-real {cfg.preset}: {stage}")
        began = time.monotonic()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                detail = getattr(run, stage)()
        except CheckFailed as err:
            report.lines.append(CheckLine(stage, "FAIL", str(err), time.monotonic() - began))
            continue
        except (ValueError, RuntimeError, KeyError, OSError, TypeError) as err:  # a loader or a shape refusing
            message = f"{type(err).__name__}: {str(err).splitlines()[0][:400] if str(err) else ''}"
            report.lines.append(CheckLine(stage, "FAIL", message, time.monotonic() - began))
            continue
        run.passed.add(stage)
        report.lines.append(CheckLine(stage, "ok", detail, time.monotonic() - began))
        if key[1] is not None:
            _DONE[key] = (detail, cfg.preset)
    return report


# Passed batch checks of this process, by what they depend on: presets that differ only in scale (workers, actors,
# replicas) share their models and settings, so `--all` runs each distinct batch once. Failures are never reused.
_DONE: dict[tuple[str, str], tuple[str, str]] = {}
_ENCODED_PAIRS: dict[tuple[str, str, int], Any] = {}  # the check's pair through an EfficientNet, by (folder, dtype, px)
_SCALE_ONLY = {
    "train": {"num_workers", "precompute_concurrency", "precompute_batch_size", "storage_path", "max_steps"},
    "embed": {"concurrency", "batch_size"},
    "eval": {"concurrency", "batch_size", "users_per_split"},
}


def _memo_key(cfg: PPDConfig, stage: str, stages: tuple[str, ...]) -> str | None:
    if stage == "config":
        return None  # cheap, and the one check that is about the preset's scale
    tree = cfg.to_dict()
    for section, fields in _SCALE_ONLY.items():
        for name in fields:
            tree[section].pop(name, None)
    if stage == "stage_c":  # the meta-device plan depends on the workers (ZeRO sharding) and the micro-batch
        tree["train"]["num_workers"] = cfg.train.num_workers
    tree.pop("preset")
    tree.pop("serve")
    tree.pop("tracking")
    if stage == "embed":  # the VLM's batch reads the embed section and the group size only: the lite and the full
        tree = {"embed": tree["embed"], "shots": tree["data"]["shots"]}  # Stage C presets share it (~3 min of bf16)
    return json.dumps({"stages": stages, "config": tree}, sort_keys=True)


# --- the run --------------------------------------------------------------------------------------------------------


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)  # smooth-ish: a photo's JPEG size
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


class _Run:
    """State shared by the stages of one preset's check (the reduced models, the batch, the adapter)."""

    def __init__(self, cfg: PPDConfig, workdir: Path, serve_generate: ServeGenerate, progress) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.serve_generate = serve_generate
        self.progress = progress
        self.passed: set[str] = set()
        self.dtype = _DTYPES[cfg.model.dtype]
        self.captions = ["a watercolor painting of a lighthouse at dawn", "a photo of a red fox in fresh snow"]
        self.pair = (_jpeg(1024, 1024, 0), _jpeg(1024, 768, 1))  # Pick-a-Pic sizes: square and 4:3
        self._run_cfg: PPDConfig | None = None

    # -- the preset as the cluster reads it ----------------------------------------------------------------------

    def config(self) -> str:
        cfg, problems = self.cfg, []
        train, embed, model = cfg.train, cfg.embed, cfg.model
        if not model.stage_c_path:
            problems.append(
                "model.stage_c_path is not set (the prior repository, e.g. stabilityai/stable-cascade-prior)"
            )
        if model.dtype == "bfloat16" and model.weights_variant != "bf16":
            problems.append("model.weights_variant should be bf16 for bf16 weights (no fp32 download and cast)")
        if not (train.use_gpu and train.precision == "bf16"):
            problems.append("training on GPUs in bf16 (train.use_gpu, train.precision)")
        per_step = train.num_workers * train.micro_batch * train.grad_accumulation
        if per_step != train.effective_batch:
            problems.append(f"workers x micro-batch x accumulation = {per_step} != effective_batch")
        for name, gpus in (
            ("train.precompute_gpus_per_actor", train.precompute_gpus_per_actor),
            ("embed.gpus_per_actor", embed.gpus_per_actor),
            ("eval.gpus_per_actor", cfg.eval.gpus_per_actor),
            ("serve.generator.gpus", cfg.serve.generator.gpus),
            ("serve.embedder.gpus", cfg.serve.embedder.gpus),
        ):
            if gpus <= 0:
                problems.append(f"{name} = 0: the encoders / generators would run on CPUs")
        if embed.embedder not in ("vlm-vllm", "vlm-hf") or not embed.vlm_path:
            problems.append(f"embed.embedder={embed.embedder} / vlm_path={embed.vlm_path}: the paper's VLM embedder")
        elif embed.vlm_path.startswith("lmms-lab/"):
            problems.append(
                f"embed.vlm_path={embed.vlm_path} is the original LLaVA repository (model_type llava_qwen), which "
                "transformers and vLLM cannot load: use its llava-hf/...-hf conversion"
            )
        if embed.layers != "all":
            problems.append(f"embed.layers={embed.layers}: the authors keep every layer's final-token state")
        if cfg.eval.judge == "oracle":
            problems.append("eval.judge=oracle reads the toy world's hidden rewards: real data needs openai or none")
        for name in cfg.eval.image_rewards:
            path = {
                "pickscore": cfg.eval.pickscore_path,
                "clip_score": cfg.eval.clip_score_path,
                "aesthetic": cfg.eval.aesthetic_clip_path,
                "hps": cfg.eval.hps_path,
            }[name]
            if path is None:
                problems.append(f"eval: the {name} checkpoint is not set (a tiny random CLIP would score)")
        if problems:
            raise CheckFailed("; ".join(problems))
        return (
            f"{train.num_workers} workers x {train.micro_batch} x {train.grad_accumulation} = "
            f"{train.effective_batch} pairs/step, bf16 ZeRO-{train.zero_stage}; GPU actors: precompute "
            f"{train.precompute_concurrency}, embed {embed.concurrency}, evaluate {cfg.eval.concurrency}; "
            f"VLM {embed.vlm_path}"
        )

    # -- Stage C at full size on the meta device -------------------------------------------------------------------

    def stage_c(self) -> str:
        from ppd.models.factory import build_meta_personalized_stage_c, parameter_report
        from ppd.models.stage_c import stage_c_unet_config
        from ppd.train.sizing import size_training

        architecture = self.cfg.model.architecture
        ours, theirs = normalised(stage_c_unet_config(architecture)), normalised(STAGE_C_PRIOR[architecture])
        differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differing:
            raise CheckFailed(
                f"Stage C config differs from {STAGE_C_SUBFOLDER[architecture]}/config.json in "
                + ", ".join(f"{k}: ours {ours.get(k)} vs {theirs.get(k)}" for k in differing)
            )
        shape = self.real_embedding_shape()
        report = parameter_report(build_meta_personalized_stage_c(architecture, shape, self.cfg.model.user_tokens))
        sizing = size_training(self.cfg, shape).to_dict()
        memory = sizing["memory_per_gpu"]
        if memory["total_bytes"] > memory["gpu_memory_bytes"]:
            raise CheckFailed(
                f"training at micro-batch {self.cfg.train.micro_batch} needs {_gib(memory['total_bytes'])} per GPU "
                f"(activations {_gib(memory['activations_bytes'])}) > {_gib(memory['gpu_memory_bytes'])}"
            )
        return (
            f"{architecture} == {STAGE_C_SUBFOLDER[architecture]}/config.json ({len(theirs)} keys); meta: "
            f"{report['total'] / 1e9:.2f}B params, {report['attention_blocks']} attention blocks, W'_k + W'_v "
            f"{report['w_k_plus_w_v']:,}; step at micro-batch {self.cfg.train.micro_batch}: "
            f"{sizing['flops']['per_pair'] / 1e12:.2f} TFLOP/pair, {_gib(memory['total_bytes'])} per GPU"
        )

    def real_embedding_shape(self) -> tuple[int, int]:
        """[L, d] of the real VLM's embeddings under this preset (from its config: no weights)."""
        from ppd.embed.vlm import HFVLMEmbedder

        identity = HFVLMEmbedder.identity_for(self.cfg.embed, "reference", llava_onevision_7b_config())
        return (len(identity.layers), llava_onevision_7b_config().text_config.hidden_size)

    # -- reduced models and the config that points at them ---------------------------------------------------------

    def run_cfg(self) -> PPDConfig:
        """The preset with every checkpoint replaced by its reduced copy in the real layout (same dtypes, variant)."""
        if self._run_cfg is None:
            cfg, model = self.cfg, self.cfg.model
            self.progress("building reduced checkpoints (first time: a minute)")
            prior = stage_c_repository(self.workdir, model.architecture, model.dtype, model.weights_variant)
            decoder = decoder_repository(self.workdir, model.dtype, model.weights_variant)
            vlm = vlm_directory(self.workdir, cfg.embed.dtype)
            rewards = reward_directories(self.workdir)
            from ppd.eval.image_rewards import AESTHETIC_HEAD_FILE

            self._run_cfg = cfg.model_copy(
                update={
                    "model": model.model_copy(
                        update={
                            "stage_c_path": str(prior),
                            "decoder_path": str(decoder),
                            "effnet_path": str(decoder),
                            "cache_dir": str(self.workdir / "cache"),
                        }
                    ),
                    "embed": cfg.embed.model_copy(update={"vlm_path": str(vlm)}),
                    "eval": cfg.eval.model_copy(
                        update={
                            "pickscore_path": str(rewards["vit_h14"]),
                            "pickscore_processor_path": None,
                            "clip_score_path": str(rewards["vit_h14"]),
                            "hps_path": str(rewards["vit_h14"]),
                            "aesthetic_clip_path": str(rewards["vit_l14"]),
                            "aesthetic_head_path": str(rewards["vit_l14"] / AESTHETIC_HEAD_FILE),
                        }
                    ),
                }
            )
        return self._run_cfg

    # -- precompute: latents, caption states, the precomputed layout -------------------------------------------------

    def precompute(self) -> str:
        from ppd.models.factory import latent_shape, load_caption_encoder
        from ppd.train.data import (
            CAPTIONS_FILE,
            EMBEDDINGS_FILE,
            PrecomputedInputs,
            PrecomputedManifest,
            SplitFiles,
            TensorTable,
            latent_column,
        )
        from ppd.train.precompute import encode_pairs, load_latent_encoder

        run_cfg = self.run_cfg()
        model = run_cfg.model
        encoder = load_latent_encoder(model, device="cpu")
        # The same EfficientNet (folder, dtype) on the same pair gives the same latents: encoded once per process
        # (85 s in bf16 on a CPU without native bf16; the lite and the full Stage C presets share the decoder).
        encoded = (str(model.effnet_path), model.dtype, encoder.image_size)
        if encoded not in _ENCODED_PAIRS:
            _ENCODED_PAIRS[encoded] = encode_pairs([self.pair[0]], [self.pair[1]], [1], encoder)
        latents = _ENCODED_PAIRS[encoded]
        expected = latent_shape(model)
        if not latents.kept.all() or tuple(latents.latents_win.shape[1:]) != expected:
            raise CheckFailed(
                f"EfficientNet at {encoder.image_size} px gives latents {list(latents.latents_win.shape[1:])}, "
                f"Stage C reads {list(expected)} (model.latent_size={model.latent_size})"
            )
        captions = load_caption_encoder(model, "cpu")
        self.caption_encoder = captions
        hidden, pooled = captions.encode_captions(self.captions[:1])  # [1, 77, C_t], [1, 1, C_t]
        prior_config = STAGE_C_PRIOR[model.architecture]
        if (hidden.shape[-1], pooled.shape[-1]) != (
            prior_config["clip_text_in_channels"],
            prior_config["clip_text_pooled_in_channels"],
        ):
            raise CheckFailed(f"caption states {list(hidden.shape)} / {list(pooled.shape)} do not fit Stage C")
        # The precomputed layout as the job writes it (tables in the model's dtype, latents in it too), read back.
        folder = self.workdir / f"precomputed-{self.cfg.preset}"
        folder.mkdir(parents=True, exist_ok=True)
        table_dtype = _DTYPES[model.dtype]
        with TensorTable.create(
            folder / CAPTIONS_FILE,
            {
                "clip_text_hidden": ((1, *hidden.shape[1:]), table_dtype),
                "clip_text_pooled": ((1, 1, pooled.shape[-1]), table_dtype),
            },
        ) as writer:
            writer.write("clip_text_hidden", [0], hidden)
            writer.write("clip_text_pooled", [0], pooled)
        embedding_shape = self.real_embedding_shape()
        user = torch.randn(1, *embedding_shape)  # [1, L, d]: the contract shape of the real VLM's embeddings
        with TensorTable.create(
            folder / EMBEDDINGS_FILE, {"user_embedding": ((1, *embedding_shape), torch.float32)}
        ) as w:
            w.write("user_embedding", [0], user)
        PrecomputedManifest(
            architecture=model.architecture,
            text_encoder=str(model.stage_c_path),
            latent_shape=expected,
            latent_dtype=model.dtype,
            text_shape=tuple(hidden.shape[1:]),
            pooled_dim=pooled.shape[-1],
            embedding_shape=embedding_shape,
            splits={"train": SplitFiles(rows=1, files=[])},
            captions=1,
            user_embeddings=1,
            rejected={"train": {}},
            order_seed=0,
        ).write(folder)
        width = int(np.prod(expected))
        rows = pa.table(
            {
                "pair_id": pa.array([0], pa.int64()),
                "caption_index": pa.array([0], pa.int64()),
                "embedding_index": pa.array([0], pa.int64()),
                "latents_win": latent_column(latents.latents_win, width, model.dtype),
                "latents_lose": latent_column(latents.latents_lose, width, model.dtype),
            }
        )
        self.batch = PrecomputedInputs(folder).batch(rows)
        stored = rows.column("latents_win").type
        return (
            f"EfficientNet (full size, random weights) {encoder.image_size} px -> {list(expected)} in {model.dtype} "
            f"(stored as {stored.value_type}); CLIP ViT-bigG ({REDUCED_LAYERS} of 32 layers) -> "
            f"{list(hidden.shape[1:])} + {list(pooled.shape[1:])}; precomputed layout read back"
        )

    # -- embed: the VLM's contract and token layouts ---------------------------------------------------------------

    def embed(self) -> str:
        from transformers import LlavaOnevisionForConditionalGeneration

        from ppd.embed.groups import FewShotGroup
        from ppd.embed.vlm import HFVLMEmbedder

        cfg, embed = self.cfg, self.cfg.embed
        real_config = llava_onevision_7b_config()
        with torch.device("meta"):
            full = LlavaOnevisionForConditionalGeneration(real_config)
        parameters = sum(p.numel() for p in full.parameters())
        shape = self.real_embedding_shape()

        # vLLM's any-resolution layout at the preset's image side: tokens per image from transformers' own packing.
        side = embed.max_image_side or 1024
        tokens_per_image = anyres_tokens_per_image(full, side, side)
        prompt_text = _prompt_text_tokens(cfg.data.shots)
        needed = 2 * cfg.data.shots * tokens_per_image + prompt_text + embed.max_new_tokens
        context = embed.max_model_len or real_config.text_config.max_position_embeddings
        if embed.embedder == "vlm-vllm" and needed > context:
            raise CheckFailed(
                f"{2 * cfg.data.shots} images of {side} px take {tokens_per_image} tokens each in vLLM's layout: "
                f"{needed} tokens with the prompt and embed.max_new_tokens > embed.max_model_len={context} "
                "(shrink embed.max_image_side or raise max_model_len)"
            )
        weights = parameters * torch.empty((), dtype=_DTYPES[embed.dtype]).element_size()
        gpu = H100.memory_bytes
        vllm_share = embed.vllm_gpu_memory_utilization * gpu if embed.embedder == "vlm-vllm" else 0
        # The forward of the hidden-state pass: the MLP's [rows, T, 2 x intermediate] dominates (bf16).
        activations = embed.forward_batch_size * needed * 2 * real_config.text_config.intermediate_size * 2
        if weights + vllm_share + activations > gpu:
            raise CheckFailed(
                f"one GPU holds the transformers copy {_gib(weights)} + vLLM's share {_gib(vllm_share)} "
                f"(embed.vllm_gpu_memory_utilization) + the forward's ~{_gib(activations)} > {_gib(gpu)}"
            )
        if embed.embedder == "vlm-vllm" and vllm_share < weights * 1.2:
            raise CheckFailed(f"vLLM's share {_gib(vllm_share)} does not hold the weights {_gib(weights)} + a KV cache")

        # One group through the reduced model (multi-image layout), then its prompt in vLLM's layout.
        run_cfg = self.run_cfg()
        check_embed = run_cfg.embed.model_copy(
            update={"embedder": "vlm-hf", "max_new_tokens": VLM_CHECK_TOKENS, "temperature": 0.0}
        )
        embedder = HFVLMEmbedder(
            run_cfg.embed.vlm_path, "reduced", check_embed, device="cpu", dtype=_DTYPES[embed.dtype]
        )
        group = FewShotGroup(0, 0, (0,), tuple(self.captions[:VLM_CHECK_SHOTS]), (self.pair[0],), (self.pair[1],), (1,))
        (row,) = embedder.embed_groups([group])
        if row.error is not None or row.embedding is None:
            raise CheckFailed(f"the VLM embedder returned an error row: {row.error}")
        reduced_layers = embedder.model.config.text_config.num_hidden_layers + 1
        if row.embedding.shape != (reduced_layers, shape[1]) or row.embedding.dtype != np.float32:
            raise CheckFailed(
                f"embedding {row.embedding.dtype} {list(row.embedding.shape)} != float32 [{reduced_layers}, {shape[1]}]"
            )
        images = embedder._decode(group)
        # The group's prompt ids (tokenised, no second generation: the forward is what reads the layout) + an end.
        prompt_ids = embedder.inputs.tokenize(embedder.prompts([group]))["input_ids"][0].tolist()
        counts = [anyres_tokens_per_image(embedder.model, *image.size) for image in images]
        anyres_ids = _expand_placeholders(prompt_ids, embedder.inputs.image_token_id, counts)
        states = embedder.states_at_final_token(
            [[*anyres_ids, *sorted(embedder.stop_ids)[:1]]], [images], layout="anyres"
        )
        if states.shape != (1, reduced_layers, shape[1]):
            raise CheckFailed(f"any-res forward gave {list(states.shape)}")
        sizes = "x".join(str(s) for s in images[0].size)
        return (
            f"LLaVA-OV 7B on meta: {parameters / 1e9:.2f}B params -> [{shape[0]}, {shape[1]}]; vLLM: "
            f"{2 * cfg.data.shots} x {tokens_per_image} + ~{prompt_text} + {embed.max_new_tokens} = {needed} <= "
            f"{context} tokens; one GPU: {_gib(weights)} + {_gib(vllm_share)} + ~{_gib(activations)} <= {_gib(gpu)}; "
            f"reduced ({REDUCED_LAYERS} of 28 LM and of 26 vision layers, {VLM_CHECK_SHOTS} pair, "
            f"{VLM_CHECK_TOKENS} tokens, offline tokenizer) -> [{reduced_layers}, {shape[1]}], any-res layout at "
            f"{sizes} px: {counts[0]} tokens/image"
        )

    # -- train, sample, serve, evaluate on the reduced Stage C ----------------------------------------------------

    def train(self) -> str:
        from ppd.models.checkpoint import save_adapter
        from ppd.models.factory import build_personalized_stage_c
        from ppd.train.step import training_step

        run_cfg = self.run_cfg()
        model = build_personalized_stage_c(run_cfg.model, self.real_embedding_shape(), "cpu")
        self.model = model
        if model.base.dtype != self.dtype or any(p.dtype != self.dtype for p in model.trainable_parameters()):
            raise CheckFailed(f"weights load as {model.base.dtype}, the preset trains in {self.dtype}")
        model.train()
        keep_user = run_cfg.train.model_copy(update={"user_dropout": 0.0})  # so that W'_v must receive a gradient
        side = CHECK_LATENT_SIDE
        batch = {  # the precomputed pair, its latents cropped to side x side (see CHECK_LATENT_SIDE)
            key: value[..., :side, :side] if key.startswith("latents_") else value for key, value in self.batch.items()
        }
        step = training_step(model, batch, keep_user, generator=torch.Generator().manual_seed(0))
        step.loss.backward()
        loss = float(step.loss.detach())
        if not math.isfinite(loss):
            raise CheckFailed(f"training loss is {loss}")
        frozen_with_grad = [n for n, p in model.base.named_parameters() if p.grad is not None]
        if frozen_with_grad:
            raise CheckFailed(f"frozen Stage C weights got gradients: {frozen_with_grad[:3]}")
        value_grads = [kv.to_v.weight.grad for kv in model.adapter.user_kv.values()]
        if any(g is None or not torch.isfinite(g).all() for g in value_grads) or all(
            g.abs().sum() == 0 for g in value_grads
        ):
            raise CheckFailed("W'_v received no (finite) gradient")
        model.zero_grad(set_to_none=True)
        model.eval()
        self.adapter_dir = save_adapter(
            model,
            self.workdir / f"adapter-{self.cfg.preset}",
            architecture=run_cfg.model.architecture,
            base_model=str(run_cfg.model.stage_c_path),
            train_method=run_cfg.train.method,
        )
        blocks = STAGE_C_PRIOR[run_cfg.model.architecture]["down_num_layers_per_block"]
        return (
            f"{run_cfg.train.method} step on 1 pair at {list(batch['latents_win'].shape[1:])} (the precomputed "
            f"{list(self.batch['latents_win'].shape[1:])} cropped) in {run_cfg.model.dtype}: "
            f"loss {loss:.4f}, gradients on the adapter only; reduced Stage C (width "
            f"{STAGE_C_PRIOR[run_cfg.model.architecture]['block_out_channels'][0]}, blocks ({REDUCED_LAYERS}, "
            f"{REDUCED_LAYERS}) per side instead of {tuple(blocks)}) loaded from {STAGE_C_SUBFOLDER[run_cfg.model.architecture]}/"
            f"*.{run_cfg.model.weights_variant + '.' if run_cfg.model.weights_variant else ''}safetensors"
        )

    def sample(self) -> str:
        from ppd.models.factory import latent_shape
        from ppd.models.schedule import row_generators
        from ppd.sample import generate_latents

        run_cfg = self.run_cfg()
        reduced = run_cfg.model.model_copy(update={"latent_size": CHECK_LATENT_SIDE})
        hidden, pooled = self.caption_encoder.encode_captions(self.captions)  # [2, 77, C_t], [2, 1, C_t]
        users = torch.randn(2, *self.real_embedding_shape())
        latents = generate_latents(
            self.model,
            hidden,
            pooled,
            latent_shape=latent_shape(reduced),
            generators=row_generators([0, 1]),
            user_embedding=users,
            user_scale=run_cfg.model.user_scale,
            steps=SAMPLER_STEPS,
            guidance=run_cfg.eval.guidance,
            unconditional_text=self.caption_encoder.unconditional_text(),
        )
        if tuple(latents.shape[1:]) != latent_shape(reduced) or not torch.isfinite(latents).all():
            raise CheckFailed(f"sampled latents {list(latents.shape)} (finite: {bool(torch.isfinite(latents).all())})")
        return (
            f"2 users x {SAMPLER_STEPS} steps, guidance {run_cfg.eval.guidance} against the encoded empty caption "
            f"-> {list(latents.shape[1:])} (latent side {CHECK_LATENT_SIDE} of the real {run_cfg.model.latent_size})"
        )

    def serve(self) -> str:
        run_cfg = self.run_cfg()
        served = run_cfg.model_copy(
            update={
                "serve": run_cfg.serve.model_copy(update={"adapter_dir": str(self.adapter_dir)}),
                "eval": run_cfg.eval.model_copy(update={"inference_steps": SAMPLER_STEPS}),
                "model": run_cfg.model.model_copy(
                    update={"decoder_steps": STAGE_B_STEPS, "latent_size": CHECK_LATENT_SIDE}
                ),
            }
        )
        user = np.random.default_rng(0).standard_normal(self.real_embedding_shape()).astype(np.float32)
        settings = {"steps": SAMPLER_STEPS, "guidance": run_cfg.eval.guidance, "user_scale": run_cfg.model.user_scale}
        jobs = [
            {"caption": self.captions[0], "seeds": [0], "users": [user], "weights": None, **settings},
            {"caption": self.captions[1], "seeds": [1], "users": None, "weights": None, **settings},
        ]
        pngs = self.serve_generate(served, jobs)
        sizes = set()
        images = []
        for per_job in pngs:
            for data in per_job:
                image = Image.open(io.BytesIO(data)).convert("RGB")
                sizes.add(image.size)
                images.append(np.asarray(image))
        # Stage C -> Stage B (x10.67) -> Stage A (x2 per level)
        side = int(CHECK_LATENT_SIDE * STAGE_C_TO_STAGE_B_SCALE) * 2 ** STAGE_A_VQGAN["levels"]
        real_side = int(run_cfg.model.latent_size * STAGE_C_TO_STAGE_B_SCALE) * 2 ** STAGE_A_VQGAN["levels"]
        if sizes != {(side, side)}:
            raise CheckFailed(f"the generator made images of {sorted(sizes)}, expected {side} x {side}")
        self.images = np.stack(images)  # [2, H, W, 3]
        return (
            f"a user and the base in one batch ({SAMPLER_STEPS} steps) -> {len(images)} PNGs of {side} px (Stage C "
            f"latent side {CHECK_LATENT_SIDE}; {real_side} px at the real {run_cfg.model.latent_size}) through "
            f"Stage B ({REDUCED_LAYERS} block per level, {STAGE_B_STEPS} of {run_cfg.model.decoder_steps} steps) and "
            f"Stage A ({REDUCED_LAYERS} of 12 bottleneck blocks)"
        )

    def evaluate(self) -> str:
        from ppd.eval.image_rewards import load_image_rewards, score_images

        run_cfg = self.run_cfg()
        rewards = load_image_rewards(run_cfg.eval, self.workdir / "cache")
        scores = score_images(rewards, self.images, self.captions)
        broken = [name for name, values in scores.items() if values.shape != (2,) or not np.isfinite(values).all()]
        if broken:
            raise CheckFailed(f"rewards without a finite score per image: {broken}")
        return (
            f"{', '.join(scores)} on {len(self.images)} generated images (ViT-H/14 and ViT-L/14 at "
            f"{REDUCED_LAYERS} layer per tower); selection by {run_cfg.eval.selection_reward}; judge {run_cfg.eval.judge}"
        )


def anyres_tokens_per_image(model: Any, width: int, height: int) -> int:
    """Placeholder tokens of one image in the any-resolution layout (vLLM's for every image), from transformers' own
    patch count and packing (base tile + the unpadded grid with one newline per row, pooled to at most 9 tiles);
    `model` may live on the meta device: only its config and packing code are used."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    patches = image_size_to_num_patches(
        image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints, patch_size=tile
    )
    features = [torch.zeros(patches, side * side, 1)]  # [tiles, 729, 1]: only the count matters
    _, lengths = model.model.pack_image_features(
        features,
        torch.tensor([[height, width]]),
        image_newline=torch.zeros(1),
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    return int(lengths[0])


def _expand_placeholders(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Prompt ids in the multi-image layout -> the same prompt with image i's placeholders repeated counts[i] times."""
    expanded, image = [], 0
    previous = None
    for token in ids:
        if token == image_token_id:
            if previous != image_token_id:
                expanded += [image_token_id] * counts[image]
                image += 1
        else:
            expanded.append(token)
        previous = token
    return expanded


def _prompt_text_tokens(shots: int) -> int:
    from ppd.embed import prompt as cot

    text = cot.render_prompt(["x" * LONG_CAPTION_CHARS] * shots, [0] * shots, "")
    return len(text) // CHARS_PER_TOKEN


def _variant_generator_serve(cfg: PPDConfig, jobs: Sequence[dict]) -> list[list[bytes]]:
    """The evaluation generator standing in for Serve's (same VariantGenerator, per-row users and scales)."""
    from ppd.data.images import png_bytes
    from ppd.eval.generate import VariantGenerator

    generator = VariantGenerator(cfg, cfg.serve.adapter_dir, device="cpu")
    out = []
    for job in jobs:
        rows = len(job["seeds"])
        if job["users"] is None:  # the base: any user at s = 0
            users, scale = np.zeros((rows, *generator.embedding_shape), np.float32), 0.0
        else:
            users, scale = np.repeat(np.stack(job["users"])[:1], rows, axis=0), None
        images = generator.generate([job["caption"]] * rows, job["seeds"], users, scale)
        out.append([png_bytes(image) for image in images])
    return out
