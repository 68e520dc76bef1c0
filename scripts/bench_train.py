"""Stage 2 training throughput: the anchor recipe vs ours on the tiny Stage C, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_train.py [--pairs DIR] [--steps 40] [--micro-batch 32]

(a) anchor, as Diffusion-DPO's public train.py works: every step decodes the pair's image bytes and encodes them
    (here the toy codec), encodes the captions with the CLIP text encoder, and runs the reference through a separate
    copy of the pretrained UNet held beside the policy;
(b) ours: latents, caption states and user embeddings precomputed once (`ppd.train.data` reads them from the
    precomputed layout of the precompute job), reference = the same network with the adapter disabled.

Both variants train the same adapter with the same loss, optimiser, pairs and per-pair randomness; each runs in its
own process (so peak memory is per variant) with one CPU thread, like one training worker. Pairs come from the toy
world's population (generated with the smoke preset when --pairs is not given); user embeddings are a fixed random
[4, 64] per user, the same in both variants (Stage 1 is not part of a training step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppd.config import PPDConfig, smoke  # noqa: E402

EMBEDDING_SHAPE = (4, 64)
MAX_PAIRS = 1024  # distinct pairs per variant; steps past them start over (a rate does not need fresh pairs)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def load_pairs(pairs_dir: Path, count: int) -> pa.Table:
    """The first `count` labelled, non-tied pairs of the toy world's population (Pick-a-Pic v2 schema)."""
    table = pq.read_table(sorted(pairs_dir.glob("*.parquet")))
    decided = pc.and_(table["are_different"], pc.not_equal(table["label_0"], table["label_1"]))
    table = table.filter(decided).slice(0, count)
    preferred = pc.cast(pc.equal(table["label_0"], 0.0), pa.int8())  # 1 = the user preferred jpg_1
    return table.append_column("preferred", preferred)


def _first_pair(step: int, micro: int, pairs: int) -> int:
    return (step % (pairs // micro)) * micro


def user_embedding(user_id: int) -> np.ndarray:
    return np.random.default_rng([11, user_id]).standard_normal(EMBEDDING_SHAPE).astype(np.float32)


def build_precomputed(cfg: PPDConfig, pairs: pa.Table, directory: Path) -> None:
    """The precompute job's output layout for `pairs`, written in-process (what variant (b) reads)."""
    from ppd.models.factory import latent_shape, load_caption_encoder
    from ppd.train.data import (
        CAPTIONS_FILE,
        EMBEDDINGS_FILE,
        PrecomputedManifest,
        SplitFiles,
        TensorTable,
    )
    from ppd.train.precompute import caption_index, encode_pairs, load_latent_encoder

    latents = encode_pairs(
        pairs["jpg_0"].to_pylist(),
        pairs["jpg_1"].to_pylist(),
        pairs["preferred"].to_numpy(),
        load_latent_encoder(cfg.model),
    )
    assert latents.kept.all()
    captions = caption_index(pairs["caption"].to_pylist())
    hidden, pooled = load_caption_encoder(cfg.model).encode_captions(list(captions))
    users = sorted(set(pairs["user_id"].to_pylist()))
    with TensorTable.create(
        directory / CAPTIONS_FILE,
        {
            "clip_text_hidden": (tuple(hidden.shape), torch.float32),
            "clip_text_pooled": (tuple(pooled.shape), torch.float32),
        },
    ) as writer:
        writer.write("clip_text_hidden", range(len(captions)), hidden)
        writer.write("clip_text_pooled", range(len(captions)), pooled)
    with TensorTable.create(
        directory / EMBEDDINGS_FILE, {"user_embedding": ((len(users), *EMBEDDING_SHAPE), torch.float32)}
    ) as writer:
        writer.write(
            "user_embedding", range(len(users)), torch.from_numpy(np.stack([user_embedding(u) for u in users]))
        )
    width = int(np.prod(latent_shape(cfg.model)))
    rows = pa.table(
        {
            "pair_id": pa.array(range(pairs.num_rows), pa.int64()),
            "caption_index": pa.array([captions[c] for c in pairs["caption"].to_pylist()], pa.int64()),
            "embedding_index": pa.array([users.index(u) for u in pairs["user_id"].to_pylist()], pa.int64()),
            "latents_win": pa.FixedSizeListArray.from_arrays(pa.array(latents.latents_win.flatten().numpy()), width),
            "latents_lose": pa.FixedSizeListArray.from_arrays(pa.array(latents.latents_lose.flatten().numpy()), width),
        }
    )
    (directory / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(rows, directory / "train" / "part-00000.parquet")
    PrecomputedManifest(
        architecture=cfg.model.architecture,
        text_encoder="tiny",
        latent_shape=latent_shape(cfg.model),
        text_shape=tuple(hidden.shape[1:]),
        pooled_dim=pooled.shape[-1],
        embedding_shape=EMBEDDING_SHAPE,
        splits={"train": SplitFiles(rows=rows.num_rows, files=["train/part-00000.parquet"])},
        captions=len(captions),
        user_embeddings=len(users),
        rejected={"train": {}},
        order_seed=0,
    ).write(directory)


def run_variant(variant: str, cfg: PPDConfig, pairs_path: Path, precomputed: Path, steps: int, warmup: int) -> dict:
    """Train `steps` micro-batches in this process and measure them (after `warmup` untimed ones)."""
    from ppd.models.factory import build_personalized_stage_c, load_caption_encoder, load_stage_c
    from ppd.train.data import PrecomputedInputs, micro_batch_generator
    from ppd.train.precompute import encode_pairs, load_latent_encoder
    from ppd.train.step import training_step

    torch.set_num_threads(1)
    rss_after_imports = _rss_mib()
    micro = cfg.train.micro_batch
    torch.manual_seed(cfg.train.seed)
    model = build_personalized_stage_c(cfg.model, EMBEDDING_SHAPE)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr)
    model.train()
    if variant == "anchor":
        # Diffusion-DPO's recipe: encoders beside the model, a separate pretrained reference network
        latent_encoder = load_latent_encoder(cfg.model)
        caption_encoder = load_caption_encoder(cfg.model)
        reference_unet = load_stage_c(cfg.model)
        pairs = load_pairs(pairs_path, MAX_PAIRS)  # raw: image bytes and caption strings
        users = {u: torch.from_numpy(user_embedding(u)) for u in set(pairs["user_id"].to_pylist())}
    else:
        inputs = PrecomputedInputs(precomputed)
        rows = pq.read_table(precomputed / "train")

    held = [model] + ([reference_unet, caption_encoder.text_encoder] if variant == "anchor" else [])
    weights_mib = sum(t.numel() * t.element_size() for m in held for t in [*m.parameters(), *m.buffers()]) / 2**20
    input_seconds = 0.0
    timed_from = None
    for step in range(steps + warmup):
        if step == warmup:
            timed_from, input_seconds = time.perf_counter(), 0.0
        started = time.perf_counter()
        if variant == "anchor":
            chunk = pairs.slice(_first_pair(step, micro, pairs.num_rows), micro)
            latents = encode_pairs(
                chunk["jpg_0"].to_pylist(), chunk["jpg_1"].to_pylist(), chunk["preferred"].to_numpy(), latent_encoder
            )
            hidden, pooled = caption_encoder.encode_captions(chunk["caption"].to_pylist())
            batch = {
                "latents_win": latents.latents_win,
                "latents_lose": latents.latents_lose,
                "clip_text_hidden": hidden,
                "clip_text_pooled": pooled,
                "user_embedding": torch.stack([users[u] for u in chunk["user_id"].to_pylist()]),
            }
        else:
            batch = inputs.batch(rows.slice(_first_pair(step, micro, rows.num_rows), micro))
        input_seconds += time.perf_counter() - started
        generator = micro_batch_generator(cfg.train.seed, step, 0)
        if variant == "anchor":
            loss = anchor_loss(model, reference_unet, batch, cfg.train, generator)
        else:
            loss = training_step(model, batch, cfg.train, generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - timed_from
    return {
        "variant": variant,
        "pairs_per_s": steps * micro / elapsed,
        "input_s_per_step": input_seconds / steps,
        "step_s": elapsed / steps,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_above_imports_mib": _peak_rss_mib() - rss_after_imports,
        "weights_mib": weights_mib,
        "final_loss": float(loss.detach()),
    }


def anchor_loss(model, reference_unet, batch, train, generator) -> torch.Tensor:
    """The loss of `training_step` for method ppd, with the reference from the separate pretrained network."""
    from ppd.models.schedule import add_noise
    from ppd.train.loss import per_sample_error, preference_loss
    from ppd.train.step import draw_pair_randomness

    win, lose = batch["latents_win"], batch["latents_lose"]  # [B, C, H, W]
    draws = draw_pair_randomness(win.shape[0], tuple(win.shape[1:]), train.user_dropout, generator)
    noisy = torch.cat(
        [add_noise(win, draws.noise, draws.timestep_ratio), add_noise(lose, draws.noise, draws.timestep_ratio)]
    )
    t = draws.timestep_ratio.repeat(2)  # [2B]
    noise = draws.noise.repeat(2, 1, 1, 1)  # [2B, C, H, W]
    pooled = batch["clip_text_pooled"].repeat(2, 1, 1)  # [2B, 1, C_t]
    hidden = batch["clip_text_hidden"].repeat(2, 1, 1)  # [2B, S, C_t]
    users = (batch["user_embedding"] * draws.keep_user.view(-1, 1, 1)).repeat(2, 1, 1)  # [2B, L, d]
    policy_pred = model(noisy, t, pooled, hidden, user_embedding=users)
    with torch.no_grad():
        clip_img = noisy.new_zeros(noisy.shape[0], 1, reference_unet.config.clip_image_in_channels)
        ref_pred = reference_unet(
            sample=noisy, timestep_ratio=t, clip_text_pooled=pooled, clip_text=hidden, clip_img=clip_img
        ).sample
    model_win, model_lose = per_sample_error(policy_pred, noise).chunk(2)
    ref_win, ref_lose = per_sample_error(ref_pred, noise).chunk(2)
    loss, _ = preference_loss(model_win, model_lose, ref_win, ref_lose, beta=train.beta, timesteps=train.timesteps)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=None, help="toy-world pairs folder (default: a fresh smoke one)")
    parser.add_argument("--steps", type=int, default=40, help="timed micro-batches per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed micro-batches first")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant (medians reported)")
    parser.add_argument("--micro-batch", type=int, default=32, help="pairs per micro-batch (tiny_cpu preset: 32)")
    parser.add_argument("--cache-dir", default=".cache/ppd/models")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--variant", choices=["anchor", "ours"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--precomputed", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    cfg = smoke().with_overrides(
        [
            f"model.cache_dir={args.cache_dir}",
            f"train.micro_batch={args.micro_batch}",
            f"train.effective_batch={args.micro_batch}",
        ]
    )
    if args.variant:
        result = run_variant(args.variant, cfg, args.pairs, args.precomputed, args.steps, args.warmup)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="ppd-bench-train-") as scratch:
        pairs_dir = args.pairs
        if pairs_dir is None:
            from ppd.data.toyworld import write_toy_world

            write_toy_world(Path(scratch) / "toy", cfg.data.toy, seed=0)
            pairs_dir = Path(scratch) / "toy" / "pairs" / "population"
        pairs = load_pairs(pairs_dir, MAX_PAIRS)
        if pairs.num_rows < args.micro_batch:
            sys.exit(f"{pairs_dir} has {pairs.num_rows} usable pairs, fewer than one micro-batch")
        precomputed = Path(scratch) / "precomputed"
        started = time.perf_counter()
        build_precomputed(cfg, pairs, precomputed)
        precompute_s = time.perf_counter() - started
        runs: dict[str, list[dict]] = {"anchor": [], "ours": []}
        # Interleaved repeats, each in a fresh process: load from other processes on the machine hits both alike.
        for _ in range(args.repeats):
            for variant in runs:
                command = [sys.executable, __file__, "--variant", variant, "--pairs", str(pairs_dir)]
                command += ["--precomputed", str(precomputed), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                command += ["--micro-batch", str(args.micro_batch), "--cache-dir", args.cache_dir]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    anchor, ours = (_summary(runs[v]) for v in ("anchor", "ours"))
    print(f"tiny Stage C, micro-batch {args.micro_batch} pairs, {args.steps} timed steps, 1 CPU thread per variant, ")
    print(
        f"median of {args.repeats} interleaved runs; one-off precompute of the {pairs.num_rows} pairs: {precompute_s:.1f} s"
    )
    print()
    print("| variant | pairs/s | s/step | inputs s/step | weights held MiB | peak RSS MiB | peak above imports MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    names = {
        "anchor": "(a) anchor: encoders every step + separate reference UNet",
        "ours": "(b) ours: precomputed inputs, reference = adapter off",
    }
    for variant, row in (("anchor", anchor), ("ours", ours)):
        print(
            f"| {names[variant]} | {row['pairs_per_s']:.1f} | {row['step_s']:.3f} | {row['input_s_per_step']:.4f} | "
            f"{row['weights_mib']:.2f} | {row['peak_rss_mib']:.0f} | {row['peak_above_imports_mib']:.0f} |"
        )
    print(
        f"\n(b)/(a): {ours['pairs_per_s'] / anchor['pairs_per_s']:.2f}x pairs/s, "
        f"{ours['weights_mib'] / anchor['weights_mib']:.2f}x weights held, "
        f"{ours['peak_rss_mib'] / anchor['peak_rss_mib']:.2f}x peak RSS"
    )
    real = real_size_weights()
    print("\nweights held per worker at real size (Stage C lite, bf16; computed on the meta device, not measured):")
    for name, gib in real.items():
        print(f"  {name:<58}{gib:6.2f} GiB")
    if args.json:
        payload = {"anchor": runs["anchor"], "ours": runs["ours"], "precompute_s": precompute_s, "real_size": real}
        args.json.write_text(json.dumps(payload, indent=2))


def _summary(runs: list[dict]) -> dict:
    """Median throughput and timings, the largest memory, over repeated runs of one variant."""
    median = {k: float(np.median([r[k] for r in runs])) for k in ("pairs_per_s", "step_s", "input_s_per_step")}
    largest = {k: max(r[k] for r in runs) for k in ("peak_rss_mib", "peak_above_imports_mib", "weights_mib")}
    return {**median, **largest}


def real_size_weights() -> dict[str, float]:
    """GiB of bf16 weights each variant keeps on a worker for Stage C lite (the anchor also holds an EfficientNet
    image encoder, ~20M parameters, not counted)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ppd.models.factory import build_meta_personalized_stage_c

    model = build_meta_personalized_stage_c("stage_c_lite", (29, 3584), user_tokens=4)
    base = sum(p.numel() for p in model.base.parameters())
    adapter = sum(p.numel() for p in model.adapter.parameters())
    bigg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
    )
    with torch.device("meta"):
        text = sum(p.numel() for p in CLIPTextModelWithProjection(bigg).parameters())
    gib = 2 / 2**30  # bytes per bf16 parameter, in GiB
    return {
        "(a) anchor: policy + reference copy + CLIP ViT-bigG text": (2 * base + adapter + text) * gib,
        "(b) ours: policy (reference = adapter off)": (base + adapter) * gib,
    }


if __name__ == "__main__":
    main()
