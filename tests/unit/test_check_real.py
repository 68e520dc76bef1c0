"""`ppd check-real`: every cluster preset checked on a CPU against the real checkpoints' layouts (no download)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ppd.check.real import anyres_tokens_per_image
from ppd.config import cluster_presets
from ppd_ray.cli.main import app

runner = CliRunner()


def _check(*args: str):
    return runner.invoke(app, ["check-real", *args])


def test_the_cluster_presets_are_the_real_architectures() -> None:
    presets = cluster_presets()
    assert {"stage_c_lite_h100x8", "stage_c_h100x8", "stage_c_lite_h100x16", "serve_lite_h100"} <= set(presets)
    assert "tiny_cpu" not in presets and "smoke" not in presets


def test_every_cluster_preset_passes_the_config_check() -> None:
    result = _check("--stage", "config")
    assert result.exit_code == 0, result.output
    for preset in cluster_presets():
        assert f"check-real {preset}: passed" in result.output


def test_config_mistakes_fail_with_what_to_change() -> None:
    result = _check(
        "--preset",
        "stage_c_lite_h100x8",
        "--stage",
        "config",
        "--set",
        "embed.vlm_path=lmms-lab/llava-onevision-qwen2-7b-ov-chat",
        "--set",
        "train.precompute_gpus_per_actor=0",
    )
    assert result.exit_code == 2
    assert "FAILED" in result.output and "model_type llava_qwen" in result.output
    assert "train.precompute_gpus_per_actor = 0" in result.output


def test_a_vllm_context_too_short_for_the_images_fails_before_any_model_is_built(tmp_path) -> None:
    args = ["--preset", "llava_ov7b_vllm_h100x8", "--stage", "embed", "--workdir", str(tmp_path)]
    result = _check(*args, "--set", "embed.max_model_len=4096")
    assert result.exit_code == 2 and "embed.max_model_len=4096" in result.output, result.output
    unshrunk = _check(*args, "--set", "embed.max_image_side=null")  # 1024 px images: ~7k tokens each
    assert unshrunk.exit_code == 2 and "shrink embed.max_image_side" in unshrunk.output, unshrunk.output
    assert not any(tmp_path.iterdir())  # refused on the arithmetic, before a reduced model was built


def test_a_micro_batch_that_does_not_fit_the_gpu_fails_on_the_meta_trace() -> None:
    result = _check("--preset", "stage_c_h100x8", "--stage", "stage_c", "--set", "train.micro_batch=16")
    assert result.exit_code == 2, result.output
    assert "training at micro-batch 16 needs" in result.output and "> 79.6 GiB" in result.output, result.output


def test_anyres_token_count_is_vllms() -> None:
    """The tiny model's 16 px images take 36 placeholders each in vLLM's layout (tests/unit/test_embed_vllm.py
    checks that count against vLLM itself): base tile 16 + a 4 x 4 grid with 4 newlines."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from ppd.embed.vlm import build_tiny_vlm_tokenizer, tiny_vlm_config

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(tiny_vlm_config(build_tiny_vlm_tokenizer()))
    assert anyres_tokens_per_image(model, 16, 16) == 36
    assert anyres_tokens_per_image(model, 64, 32) > anyres_tokens_per_image(model, 32, 32)  # more tiles


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~11 min on a 2-core AVX2 box, where bf16 has no native kernels (see CHECK_LATENT_SIDE)
def test_every_cluster_preset_passes_on_reduced_models(tmp_path) -> None:
    """The whole check, every preset (presets sharing models reuse the batch of the first)."""
    result = _check("--workdir", str(tmp_path))
    assert result.exit_code == 0, result.output
    for preset in cluster_presets():
        assert f"check-real {preset}: passed" in result.output
    for stage in ("config", "stage_c", "precompute", "embed", "train", "sample", "serve", "evaluate"):
        assert result.output.count(f"] {stage} ") == len(cluster_presets()), stage
    # the reductions are stated, and the real sizes are the meta device's
    assert "1 of 28 LM and of 26 vision layers" in result.output and "8.03B params -> [29, 3584]" in result.output
    assert "W'_k + W'_v 150,994,944" in result.output  # the paper's ~150M trainable on the lite 1B
    assert "-> [16, 24, 24] in bfloat16" in result.output  # the precompute encodes at the real size
    # the batch runs at a reduced latent side, and says what the real one gives
    assert "at [16, 6, 6] (the precomputed [16, 24, 24] cropped) in bfloat16" in result.output
    assert "PNGs of 256 px (Stage C latent side 6; 1024 px at the real 24)" in result.output
