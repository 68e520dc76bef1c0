"""Meta-device sizing (`ppd model plan`): parameters, FLOPs counted by torch, activation memory, epoch projection."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from ppd.config import load_config
from ppd.models.factory import build_meta_personalized_stage_c, latent_shape
from ppd.models.stage_c import attention_blocks
from ppd.models.text import CLIP_MAX_LENGTH
from ppd.train.sizing import H100, PAPER_EPOCH_SECONDS, measure_training_step, size_training, zero_memory_per_gpu
from ppd_ray.cli.main import app

TINY_EMBEDDING = (4, 64)


@pytest.fixture(scope="module")
def tiny_plan():
    return size_training(load_config("tiny_cpu"), TINY_EMBEDDING)


def test_parameter_counts_are_the_models_own(tiny_plan) -> None:
    cfg = load_config("tiny_cpu")
    model = build_meta_personalized_stage_c("tiny", TINY_EMBEDDING, cfg.model.user_tokens)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert tiny_plan.parameters["trainable"] == trainable
    assert tiny_plan.parameters["total"] == sum(p.numel() for p in model.parameters())
    adapter_kv = [p for name, p in model.adapter.named_parameters() if name.endswith(("to_k.weight", "to_v.weight"))]
    assert adapter_kv and tiny_plan.parameters["w_k_plus_w_v"] == sum(p.numel() for p in adapter_kv)


def test_adapter_flops_match_a_hand_count() -> None:
    cfg = load_config("tiny_cpu")
    model = build_meta_personalized_stage_c("tiny", TINY_EMBEDDING, cfg.model.user_tokens)
    step = measure_training_step(model, cfg.train, latent_shape(cfg.model), micro_batch=2)
    tokens, layers, width = cfg.model.user_tokens, *TINY_EMBEDDING
    cond = model.base.config.conditioning_dim
    # A level's blocks attend over its own H x W: the real Stage C keeps the latent resolution in every level
    # (switch_level False), the tiny one halves it into level 1 (switch_level True).
    switch_level = model.base.config.switch_level
    levels = len(model.base.config.block_out_channels)

    def queries_at(name: str) -> int:
        stack, index = name.split(".")[:2]
        level = int(index) if stack == "down_blocks" else levels - 1 - int(index)
        side = cfg.model.latent_size // 2 ** sum(bool(s) for s in switch_level[:level])
        return side * side

    expected = 2 * tokens * layers * width + 2 * tokens * width * cond  # layer mix + d -> c_cond projection
    for name, block in attention_blocks(model.base):
        channels = block.attention.inner_dim
        queries = queries_at(name)
        expected += 2 * (2 * tokens * cond * channels)  # W'_k and W'_v on the user tokens
        expected += 2 * (2 * queries * tokens * channels)  # Q K'^T and softmax(.) V' over all heads
    images = 2 * step.micro_batch
    assert step.adapter_forward_flops == images * expected


def test_per_image_forward_is_the_base_model_forward(tiny_plan) -> None:
    model = build_meta_personalized_stage_c("tiny", TINY_EMBEDDING, 4)
    config = model.base.config
    with torch.device("meta"):
        inputs = (
            torch.empty(1, *tiny_plan.latent_shape),
            torch.empty(1),
            torch.empty(1, 1, config.clip_text_pooled_in_channels),
            torch.empty(1, CLIP_MAX_LENGTH, config.clip_text_in_channels),
        )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    assert tiny_plan.per_image_forward_flops == counter.get_total_flops()


def test_activation_memory_grows_with_the_micro_batch_and_checkpointing_saves_some() -> None:
    cfg = load_config("tiny_cpu")
    model = build_meta_personalized_stage_c("tiny", TINY_EMBEDDING, cfg.model.user_tokens)
    steps = [measure_training_step(model, cfg.train, latent_shape(cfg.model), micro_batch=m) for m in (1, 2, 4)]
    saved = [step.saved_activation_bytes for step in steps]
    assert saved[0] < saved[1] < saved[2]
    assert all(0 < step.checkpointed_activation_bytes < step.saved_activation_bytes for step in steps)
    # FLOPs are linear in the batch.
    assert steps[2].policy_forward_flops == 4 * steps[0].policy_forward_flops


def test_zero2_shards_gradients_and_optimizer_state_but_not_the_frozen_base() -> None:
    cfg = load_config("tiny_cpu")
    model = build_meta_personalized_stage_c("tiny", TINY_EMBEDDING, 4)
    step = measure_training_step(model, cfg.train, latent_shape(cfg.model), micro_batch=1)
    memory = zero_memory_per_gpu(1000, 80, "bfloat16", zero_stage=2, workers=8, step=step)
    assert memory.base_weights_bytes == 2000
    assert memory.adapter_weights_bytes == 160
    assert memory.adapter_gradients_bytes == 160 // 8
    assert memory.optimizer_state_bytes == 80 * 12 // 8  # fp32 master + Adam m + v, sharded
    assert memory.total_bytes == 2000 + 160 + 20 + 120 + step.saved_activation_bytes
    stage1 = zero_memory_per_gpu(1000, 80, "bfloat16", zero_stage=1, workers=8, step=step)
    assert stage1.adapter_gradients_bytes == 160


def test_epoch_projection_scales_with_gpus_and_mfu_and_meets_the_papers_time_at_its_implied_mfu(tiny_plan) -> None:
    twice_the_gpus = dataclasses.replace(tiny_plan, gpus=2 * tiny_plan.gpus)
    for mfu in (0.2, 0.4):
        assert twice_the_gpus.epoch_seconds(mfu) == pytest.approx(tiny_plan.epoch_seconds(mfu) / 2)
    assert tiny_plan.epoch_seconds(0.2) == pytest.approx(2 * tiny_plan.epoch_seconds(0.4))
    assert tiny_plan.epoch_seconds(tiny_plan.paper_implied_mfu) == pytest.approx(PAPER_EPOCH_SECONDS)
    projections = tiny_plan.to_dict()["epoch"]["projections"]
    assert [row["mfu"] for row in projections] == list(tiny_plan.mfu_levels)
    assert all(row["seconds"] == pytest.approx(tiny_plan.epoch_seconds(row["mfu"]), abs=0.1) for row in projections)


def test_lite_stage_c_plan_matches_the_paper_and_design_figures() -> None:
    sizing = size_training(load_config("stage_c_lite_h100x8"), (29, 3584))
    assert sizing.parameters["w_k_plus_w_v"] == 150_994_944  # paper: ~150M trainable
    assert sizing.per_image_forward_flops == pytest.approx(1.17e12, rel=0.02)  # DESIGN.md: ~1.17 TFLOP at 24 x 24
    assert sizing.memory.micro_batch == 16 and sizing.memory.data_parallel_workers == 8
    assert sizing.memory.total_bytes < H100.memory_bytes


def test_cli_plan_json_and_unknown_preset() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["model", "plan", "--preset", "tiny_cpu", "--embedding-shape", "4x64", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) >= {"parameters", "flops", "memory_per_gpu", "epoch"}
    assert report["flops"]["per_pair"] > 0 and report["memory_per_gpu"]["zero_stage"] == 2
    bad = runner.invoke(app, ["model", "plan", "--preset", "stage_c_huge"])
    assert bad.exit_code == 2
    assert "not a config preset" in bad.output and "Traceback" not in bad.output
