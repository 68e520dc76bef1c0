"""The GPU check: Stage C lite at real size on one GPU, the real training step, MFU, memory, generator latency.

    python scripts/gpu_check.py --out runs/gpu_check            # on a machine with one CUDA GPU (< 8 minutes)
    python scripts/gpu_check.py --tiny --out /tmp/gpu_check     # the same code on the tiny model, CPU (the test)

What it measures (random weights: speed does not depend on them; nothing is downloaded):

1. Training: Stage C lite (1.0B, width 1536) + the user adapter for [29, 3584] embeddings, in bf16 with PyTorch SDPA
   attention, one optimiser step of the preset's micro-batch (16 pairs at 16 x 24 x 24 latents): the project's
   `training_step` (policy + adapter-off reference on winner and loser), backward, AdamW on the adapter. Reported:
   pairs/s, MFU = FLOPs per pair (counted by `ppd model plan` on the meta device) x pairs/s / the GPU's dense bf16
   peak, peak memory.
2. Generation: a batch of 8 users, `eval.inference_steps` sampler steps with text guidance, then Stage B (1.5B) +
   Stage A (real configs) to 1024 px images: seconds per batch.
3. The projected epoch of ~0.8M Pick-a-Pic pairs on 8 x H100 and 2 x 8 x H100 from the measured step (scaled to an
   H100's peak when measured on another GPU; data-parallel scaling assumed ideal: ZeRO-2 reduces only the adapter's
   gradients).

It writes `<out>/gpu_check.json` and replaces the section between the gpu-check markers of BENCHMARKS.md
(`--benchmarks FILE`; `--no-benchmarks` to leave it alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppd.check.reduced import built_in  # noqa: E402
from ppd.config import PPDConfig, load_config  # noqa: E402
from ppd.train.sizing import PICKAPIC_TRAIN_PAIRS, size_training  # noqa: E402

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
REAL_EMBEDDING_SHAPE = (29, 3584)  # LLaVA-OneVision 7B, every layer's final-token state
TINY_EMBEDDING_SHAPE = (4, 64)
H100_PEAK = 989e12
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by the name torch reports; the longest matching key wins.
PEAK_BF16 = {
    "H100 80GB HBM3": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H20": 148e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def dense_bf16_peak(device_name: str) -> float | None:
    """The GPU's dense bf16 peak from its name, None when unknown (then no MFU is reported)."""
    matches = [key for key in PEAK_BF16 if key.lower() in device_name.lower()]
    return PEAK_BF16[max(matches, key=len)] if matches else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg: PPDConfig, embedding_shape: tuple[int, int], device: torch.device):
    """Stage C of the preset (random weights) + a fresh user adapter, in the preset's dtype, on `device`."""
    from ppd.models.adapter import PersonalizedStageC, UserAdapter
    from ppd.models.factory import adapter_config
    from ppd.models.stage_c import build_stage_c

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    with built_in(dtype, device):
        base = build_stage_c(cfg.model.architecture, device=device)
        adapter = UserAdapter(adapter_config(cfg.model, embedding_shape, base), base)
    return PersonalizedStageC(base.eval().requires_grad_(False), adapter)


def training_batch(cfg: PPDConfig, model, pairs: int, embedding_shape, device: torch.device, seed: int = 0) -> dict:
    """A micro-batch shaped as the precomputed inputs give it (float32, as `PrecomputedInputs.batch` returns)."""
    from ppd.models.factory import latent_shape

    generator = torch.Generator().manual_seed(seed)
    config = model.base.config
    shape = latent_shape(cfg.model)
    batch = {
        "latents_win": torch.randn(pairs, *shape, generator=generator),  # [B, C, H, W]
        "latents_lose": torch.randn(pairs, *shape, generator=generator),
        "clip_text_hidden": torch.randn(pairs, 77, config.clip_text_in_channels, generator=generator),
        "clip_text_pooled": torch.randn(pairs, 1, config.clip_text_pooled_in_channels, generator=generator),
        "user_embedding": torch.randn(pairs, *embedding_shape, generator=generator),  # [B, L, d]
    }
    return {key: value.to(device) for key, value in batch.items()}


def measure_training(cfg: PPDConfig, model, embedding_shape, device: torch.device, steps: int, warmup: int) -> dict:
    """Seconds per optimiser step of one micro-batch (forward + backward + AdamW), pairs/s, peak memory."""
    from ppd.train.step import training_step

    micro_batch = cfg.train.micro_batch
    batch = training_batch(cfg, model, micro_batch, embedding_shape, device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, foreach=True)
    generator = torch.Generator(device=device).manual_seed(0)
    model.train()

    def step() -> float:
        output = training_step(model, batch, cfg.train, generator=generator)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(output.loss.detach())

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    seconds = (time.perf_counter() - began) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "micro_batch": micro_batch,
        "steps": steps,
        "warmup_steps": warmup,
        "seconds_per_step": seconds,
        "pairs_per_second": micro_batch / seconds,
        "peak_memory_bytes": peak,
        "final_loss": losses[-1],
    }


def build_decoder(cfg: PPDConfig, device: torch.device):
    """The toy codec (tiny) or Stage B + Stage A at the real checkpoints' configs with random weights."""
    if cfg.model.architecture == "tiny":
        from ppd.models.codec import ToyCodec

        return ToyCodec()
    from diffusers import StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    from ppd.models.codec import StageBADecoder
    from ppd.models.reference import STAGE_A_VQGAN, STAGE_B_DECODER

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    with built_in(dtype, device):
        stage_b = StableCascadeUNet(**STAGE_B_DECODER)
        stage_a = PaellaVQModel(**STAGE_A_VQGAN)
    return StageBADecoder(stage_b, stage_a, steps=cfg.model.decoder_steps)


def measure_generation(cfg: PPDConfig, model, decoder, embedding_shape, device: torch.device, users: int) -> dict:
    """Seconds to generate one image for each of `users` users (sampler + decoder), after one short warm-up batch."""
    from ppd.models.factory import latent_shape
    from ppd.sample import generate_images

    config = model.base.config
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(users, 77, config.clip_text_in_channels, generator=generator).to(device)
    pooled = torch.randn(users, 1, config.clip_text_pooled_in_channels, generator=generator).to(device)
    unconditional = (hidden[:1].clone(), pooled[:1].clone())
    embeddings = torch.randn(users, *embedding_shape, generator=generator)
    model.eval()

    def generate(steps: int) -> torch.Tensor:
        return generate_images(
            model,
            decoder,
            hidden,
            pooled,
            seeds=list(range(users)),
            latent_shape=latent_shape(cfg.model),
            user_embedding=embeddings,
            user_scale=cfg.model.user_scale,
            steps=steps,
            guidance=cfg.eval.guidance,
            unconditional_text=unconditional,
        )

    generate(2)  # warm-up: kernels chosen, memory pools filled
    _sync(device)
    began = time.perf_counter()
    images = generate(cfg.eval.inference_steps)
    _sync(device)
    seconds = time.perf_counter() - began
    return {
        "users": users,
        "sampler_steps": cfg.eval.inference_steps,
        "guidance": cfg.eval.guidance,
        "decoder_steps": getattr(decoder, "steps", 0),
        "image_shape": list(images.shape[1:]),
        "seconds_per_batch": seconds,
        "seconds_per_image": seconds / users,
    }


def projections(pairs_per_second: float, peak: float | None, pairs: int) -> dict | None:
    """Epoch times on 8 and 16 H100s from the measured rate, scaled by peak FLOP/s when measured on another GPU;
    None without a known GPU peak (a CPU rate says nothing about an H100)."""
    if not peak:
        return None
    per_h100 = pairs_per_second * H100_PEAK / peak
    return {
        "pairs": pairs,
        "pairs_per_second_per_h100": per_h100,
        "scaled_from_measured_gpu": peak != H100_PEAK,
        "epoch_seconds": {str(gpus): pairs / (gpus * per_h100) for gpus in (8, 16)},
        "assumption": "ideal data-parallel scaling (ZeRO-2 all-reduces only the adapter's gradients)",
    }


def run(args: argparse.Namespace) -> dict:
    """Run every measurement; returns the JSON written to <out>/gpu_check.json."""
    began = time.perf_counter()
    if args.tiny:
        cfg = load_config("smoke", [f"model.cache_dir={args.out / 'cache'}"])
        embedding_shape, device = TINY_EMBEDDING_SHAPE, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA GPU here; run with --tiny for the CPU path")
        cfg = load_config(args.preset)
        embedding_shape, device = REAL_EMBEDDING_SHAPE, torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.micro_batch:
        cfg = cfg.with_overrides([f"train.micro_batch={args.micro_batch}", f"train.effective_batch={args.micro_batch}"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = dense_bf16_peak(name) if device.type == "cuda" else None
    print(f"[gpu-check] {name}: {cfg.preset} ({cfg.model.architecture}, {cfg.model.dtype})", flush=True)

    flops_per_pair = size_training(cfg, embedding_shape).flops_per_pair  # meta device, same step
    model = build_model(cfg, embedding_shape, device)
    parameters = {
        "base": sum(p.numel() for p in model.base.parameters()),
        "trainable": sum(p.numel() for p in model.trainable_parameters()),
    }
    print(f"[gpu-check] model built: {parameters}; training ...", flush=True)
    training = measure_training(cfg, model, embedding_shape, device, args.steps, args.warmup)
    training["flops_per_pair"] = flops_per_pair
    training["achieved_flops"] = flops_per_pair * training["pairs_per_second"]
    training["mfu"] = training["achieved_flops"] / peak if peak else None
    print(f"[gpu-check] training: {training['pairs_per_second']:.2f} pairs/s; generation ...", flush=True)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    decoder = build_decoder(cfg, device)
    generation = measure_generation(cfg, model, decoder, embedding_shape, device, args.users)
    if device.type == "cuda":
        generation["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    sdpa = (
        {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
        if device.type == "cuda"
        else {}
    )
    return {
        "path": "tiny" if args.tiny else "real",
        "preset": cfg.preset,
        "architecture": cfg.model.architecture,
        "dtype": cfg.model.dtype,
        "device": name,
        "dense_bf16_peak_flops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sdpa_backends": sdpa,
        "embedding_shape": list(embedding_shape),
        "parameters": parameters,
        "training": training,
        "generation": generation,
        "projection": projections(training["pairs_per_second"], peak, PICKAPIC_TRAIN_PAIRS),
        "seconds": time.perf_counter() - began,
    }


def _gib(count: float | None) -> str:
    return "n/a" if count is None else f"{count / 2**30:.1f} GiB"


def benchmarks_section(result: dict) -> str:
    """The BENCHMARKS.md section of a result."""
    training, generation, projection = result["training"], result["generation"], result["projection"]
    mfu = "n/a (unknown peak)" if training["mfu"] is None else f"{training['mfu']:.1%}"
    if projection is None:
        projected = ["| projected epoch on H100s | n/a (not measured on a GPU of known peak) |"]
    else:
        epochs = projection["epoch_seconds"]
        scaled = " (scaled to an H100's peak)" if projection["scaled_from_measured_gpu"] else ""
        projected = [
            f"| projected epoch, {projection['pairs']:,} pairs, 8 x H100{scaled} | {_hours(epochs['8'])} |",
            f"| projected epoch, 2 x 8 x H100{scaled} | {_hours(epochs['16'])} |",
            "",
            f"Projection: {projection['assumption']}.",
        ]
    lines = [
        BEGIN,
        f"Measured by `scripts/gpu_check.py` ({result['path']} path) on **{result['device']}**, torch "
        f"{result['torch']}, CUDA {result['cuda']}; {result['preset']}: Stage C {result['architecture']} in "
        f"{result['dtype']}, random weights, user embedding {result['embedding_shape'][0]}x"
        f"{result['embedding_shape'][1]}; SDPA backends {result['sdpa_backends'] or 'n/a'}; run time "
        f"{result['seconds']:.0f} s.",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| training step (micro-batch {training['micro_batch']} pairs, {training['steps']} timed steps) | "
        f"{training['seconds_per_step']:.3f} s |",
        f"| pairs/s on this device | {training['pairs_per_second']:.2f} |",
        f"| FLOPs per DPO pair (meta-device count) | {training['flops_per_pair'] / 1e9:,.1f} GFLOP |",
        f"| MFU (dense bf16 peak {_tflops(result['dense_bf16_peak_flops'])}) | {mfu} |",
        f"| peak memory, training | {_gib(training['peak_memory_bytes'])} |",
        f"| generation, batch of {generation['users']} users ({generation['sampler_steps']} steps, guidance "
        f"{generation['guidance']}, Stage B {generation['decoder_steps']} steps) -> {generation['image_shape']} | "
        f"{generation['seconds_per_batch']:.2f} s ({generation['seconds_per_image']:.2f} s/image) |",
        f"| peak memory, generation | {_gib(generation.get('peak_memory_bytes'))} |",
        *projected,
        END,
    ]
    return "\n".join(lines)


def _tflops(value: float | None) -> str:
    return "unknown" if value is None else f"{value / 1e12:.0f} TFLOP/s"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds / 60:.0f} min)"


def write_benchmarks(path: Path, section: str) -> None:
    """Replace the text between the gpu-check markers of `path` (appended under a heading when absent)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## GPU check (scripts/gpu_check.py)\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--preset", default="stage_c_lite_h100x8", help="the training preset measured (real path)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (what the test runs)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--users", type=int, default=8, help="users in the generation batch")
    parser.add_argument("--micro-batch", type=int, default=None, help="pairs per step (default: the preset's)")
    parser.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-benchmarks", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    section = benchmarks_section(result)
    if not args.no_benchmarks:
        write_benchmarks(args.benchmarks, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
