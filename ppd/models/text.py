"""Caption conditioning: CLIP text encoder + tokenizer (real or tiny), and the caption-augmentation baseline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from ppd.models.stage_c import TINY_CLIP_DIM

# CLIP's context length (the real tokenizer's model_max_length); the tiny tokenizer keeps it.
CLIP_MAX_LENGTH = 77

# Words the tiny tokenizer learns merges for (captions and profiles of the toy world, and common caption words).
# Anything else still tokenizes: every byte is in the vocabulary, as in CLIP's own byte-level BPE.
_TINY_TOKENIZER_CORPUS = """
a an the of on in with and at near far over under left right top bottom centre center middle corner edge
small large big tiny huge medium sized size circle square triangle diamond star ring cross blob shape shapes
red orange yellow green teal blue purple pink white black grey gray brown cyan magenta dark light bright dim pale
vivid muted saturated desaturated warm cool colour color colours colors background foreground picture image
photo painting drawing showing of two three several many one single centred centered off offset bold soft sharp
user prefers preferred likes dislikes profile images that are more less than very rather strongly slightly
brightness saturation centredness warmth contrast composition style mood scene sky sea forest city cat dog
"""


def build_tiny_clip_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer trained locally (offline) on a small corpus; every byte stays encodable.

    The merges are learned here, deterministically (most frequent pair first, ties in lexical order): the `tokenizers`
    trainer breaks ties by hash order, which gave a different vocabulary on every build."""
    texts = list(corpus) if corpus is not None else _TINY_TOKENIZER_CORPUS.split("\n")
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_to_symbol = dict(zip(sorted(set(range(256))), _bytes_to_unicode(), strict=True))
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word in text.lower().split():
            symbols = [byte_to_symbol[b] for b in word.encode("utf-8")]
            words[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    # Vocabulary laid out as CLIP's: every byte, every byte ending a word, learned merges, then the two specials.
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    while len(tokens) + 2 < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        words = Counter({_merge(word, best, merged): count for word, count in words.items()})
    tokens += [bos, eos]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _merge(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            out.append(merged)
            index += 2
        else:
            out.append(word[index])
            index += 1
    return tuple(out)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each byte value 0..255 (the byte-level alphabet, in byte order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, codes, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


def tiny_clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder config matching `tokenizer` (77 positions, projection 32)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_CLIP_DIM,
        intermediate_size=2 * TINY_CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TINY_CLIP_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


class CaptionEncoder:
    """Captions -> the two text inputs of Stage C, computed as Stable Cascade's prior pipeline does."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self._unconditional: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def hidden_dim(self) -> int:
        """Width of the per-token hidden states (1280 for CLIP ViT-bigG)."""
        return self.text_encoder.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled, projected embedding (1280 for CLIP ViT-bigG)."""
        return self.text_encoder.config.projection_dim

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_text_hidden [B, 77, C], clip_text_pooled [B, 1, C]) in float32 on the encoder's device.

        Hidden states are `hidden_states[-1]` (the last layer before the final LayerNorm), which is what the
        pretrained Stage C was trained on; pooled is the projected `text_embeds`, made 3-D as Stage C requires.
        """
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        output = self.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        )
        clip_text_hidden = output.hidden_states[-1].float()  # [B, 77, C]
        clip_text_pooled = output.text_embeds.unsqueeze(1).float()  # [B, 1, C]
        return clip_text_hidden, clip_text_pooled

    def unconditional_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded empty caption "" ([1, 77, C], [1, 1, C]): the unconditional branch of text guidance.

        Stable Cascade drops captions to "" in training (and its diffusers prior pipeline guides against it); the toy
        base is pretrained the same way, so guidance never runs against zeros the model has not seen.
        """
        if self._unconditional is None:
            self._unconditional = self.encode_captions([""])
        return self._unconditional


def augment_caption(caption: str, profile: str, max_profile_words: int = 40) -> str:
    """Caption-augmentation baseline: the caption, then at most `max_profile_words` words of the user's profile.

    The caption comes first so that CLIP's 77-token truncation can only cut the profile, never the caption.
    """
    words = profile.split()[:max_profile_words]
    caption = caption.strip()
    if not words:
        return caption
    separator = " " if caption.endswith((".", "!", "?")) else ". "
    return f"{caption}{separator}{' '.join(words)}"
