"""Pretraining of the toy-world base: the tiny Stage C (and its tiny CLIP text encoder) learn to draw the toy world.

The result plays the role of pretrained Stable Cascade: frozen during preference fine-tuning, and the DPO reference.
Recipe (what made the difference against the first base, which drew flat colour fields):

- ε-prediction on Stable Cascade's cosine schedule, t ~ U(0, 1), freshly rendered images every step (no fixed
  dataset to memorise), weighted by min-SNR-γ (ω = min(SNR, γ)/SNR): low-noise steps, whose ε-error dominates a plain
  mean, no longer drown the high-noise steps that decide where and what the object is;
- the text encoder is trained with the base for the first `text_encoder_steps` (a frozen random CLIP barely separates
  "red circle" from "blue ring"), then frozen (its EMA) like the real one: from then on the grammar's captions are
  encoded once, not every step; captions are dropped (10%) to the encoded empty caption "", what Stable Cascade does
  and what guidance runs against;
- AdamW with warm-up and cosine decay; an EMA of both networks is what gets saved.

Layout of the saved base (as `stabilityai/stable-cascade-prior`): `prior/`, `text_encoder/`, `tokenizer/`, plus
`pretraining.json` (settings, steps, loss, quality gate). `training_state/` holds what a resume needs (raw weights,
optimiser moments, RNG states; safetensors + JSON): `--resume-from` continues a run in chunks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableCascadeUNet
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from ppd.config import PPDConfig
from ppd.data.toyworld import caption_grammar, render, sample_scene_params
from ppd.models.codec import ToyCodec
from ppd.models.schedule import add_noise, alpha_cumprod
from ppd.models.stage_c import build_stage_c
from ppd.models.text import CLIP_MAX_LENGTH, build_tiny_clip_tokenizer, tiny_clip_text_config

logger = logging.getLogger(__name__)

PRETRAINING_RECORD = "pretraining.json"
TRAINING_STATE = "training_state"
# What captions were dropped to in pretraining, i.e. what guidance must run against (read by nothing else: the
# project's guidance always uses the encoded empty caption; recorded so the base says how it was made).
UNCONDITIONAL_CAPTION = ""


@dataclass(frozen=True)
class PretrainSettings:
    """How long and how hard to pretrain the toy base."""

    steps: int = 12_000  # total optimiser steps of the run (a resumed run continues up to this)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1  # cosine decay to lr * this at `steps`
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    text_encoder_steps: int = 3000  # steps the text encoder trains with the base before it is frozen
    # A text encoder pretrained on its own (`ppd toy pretrain-text`: text_encoder/ + tokenizer/), frozen from the first
    # step as the real CLIP is; replaces the fresh or resumed one, and `text_encoder_steps` no longer applies.
    text_encoder_from: Path | None = None
    min_snr_gamma: float = 5.0  # 0 = plain mean of the ε-errors
    seed: int = 0
    resume_from: Path | None = None  # a saved base (with training_state/: exact resume; without: warm start)
    max_seconds: float | None = None  # stop early (state saved) after this long: for chunks on a shared machine
    stop_at: int | None = None  # stop early (state saved) once this many steps are done: deterministic chunks


def images_to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the toy codec's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def learning_rate(settings: PretrainSettings, step: int) -> float:
    """Warm-up over `warmup_steps`, then cosine decay to `final_lr_fraction` of lr at `steps`."""
    warm = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    progress = min(1.0, step / max(1, settings.steps))
    floor = settings.final_lr_fraction
    return settings.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def min_snr_weights(timestep_ratio: torch.Tensor, gamma: float) -> torch.Tensor:
    """ω(t) = min(SNR, γ)/SNR for ε-prediction (1 where SNR <= γ); all ones when γ = 0. [B] -> [B]."""
    if gamma <= 0:
        return torch.ones_like(timestep_ratio)
    abar = alpha_cumprod(timestep_ratio)
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


class _Networks:
    """Stage C + text encoder being trained, their EMAs, the optimiser and where the data stream is."""

    def __init__(self, cfg: PPDConfig, settings: PretrainSettings) -> None:
        torch.manual_seed(settings.seed)
        source = settings.resume_from
        if source is None:
            self.unet = build_stage_c("tiny")
            self.tokenizer = build_tiny_clip_tokenizer()
            self.text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(self.tokenizer))
        else:
            self.unet = StableCascadeUNet.from_pretrained(source, subfolder="prior")
            self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder")
        if settings.text_encoder_from is not None:
            self.tokenizer = CLIPTokenizer.from_pretrained(settings.text_encoder_from, subfolder="tokenizer")
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(
                settings.text_encoder_from, subfolder="text_encoder"
            )
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).eval().requires_grad_(False)
        self.unet.train().requires_grad_(True)
        self.text_encoder.train().requires_grad_(True)
        self.parameters = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.lr, weight_decay=0.0)
        self.rng = np.random.default_rng([settings.seed, 23])
        self.step = 0
        self.losses: list[float] = []
        self._frozen: tuple[dict[str, int], torch.Tensor, torch.Tensor] | None = None
        state = None if source is None else Path(source) / TRAINING_STATE
        if state is not None and (state / "state.json").is_file():
            self._load_state(state)

    def named_parts(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def save_state(self, directory: Path) -> None:
        """Raw weights, AdamW moments and RNG states: everything an exact resume needs (no pickles)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, module in self.named_parts().items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, directory / f"{name}.safetensors")
        moments: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        for index, parameter in enumerate(self.parameters):
            entry = self.optimizer.state.get(parameter)
            if entry:
                moments[f"{index}.exp_avg"] = entry["exp_avg"].contiguous()
                moments[f"{index}.exp_avg_sq"] = entry["exp_avg_sq"].contiguous()
                steps[str(index)] = float(entry["step"])
        moments["torch_rng"] = torch.get_rng_state()
        save_file(moments, directory / "optimizer.safetensors")
        record = {
            "step": self.step,
            "adam_steps": steps,
            "numpy_rng": self.rng.bit_generator.state,
            "losses": self.losses,
        }
        (directory / "state.json").write_text(json.dumps(record))

    def _load_state(self, directory: Path) -> None:
        for name, module in self.named_parts().items():
            module.load_state_dict(load_file(directory / f"{name}.safetensors"))
        record = json.loads((directory / "state.json").read_text())
        moments = load_file(directory / "optimizer.safetensors")
        for index, parameter in enumerate(self.parameters):
            if str(index) in record["adam_steps"]:
                self.optimizer.state[parameter] = {
                    "step": torch.tensor(record["adam_steps"][str(index)]),
                    "exp_avg": moments[f"{index}.exp_avg"],
                    "exp_avg_sq": moments[f"{index}.exp_avg_sq"],
                }
        torch.set_rng_state(moments["torch_rng"])
        self.rng.bit_generator.state = record["numpy_rng"]
        self.step, self.losses = int(record["step"]), list(record["losses"])

    def frozen_text(self, captions: list[str], freezing_now: bool):
        """Caption states from the frozen text encoder (its EMA, copied into the live one when it is frozen), each
        distinct caption encoded once."""
        if freezing_now or self._frozen is None:
            self.text_encoder.load_state_dict(self.ema_text.state_dict())
            self.text_encoder.eval().requires_grad_(False)
            grammar = [UNCONDITIONAL_CAPTION, *caption_grammar()]
            with torch.no_grad():
                hidden, pooled = self.encode(self.text_encoder, grammar)
            self._frozen = ({c: i for i, c in enumerate(grammar)}, hidden, pooled)
        index, hidden, pooled = self._frozen
        rows = torch.tensor([index[c] for c in captions])
        return hidden[rows], pooled[rows]  # [B, 77, C], [B, 1, C]

    def encode(self, text_encoder: CLIPTextModelWithProjection, captions: list[str]):
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        output = text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        )
        return output.hidden_states[-1], output.text_embeds.unsqueeze(1)  # [B, 77, C], [B, 1, C]: as CaptionEncoder


def _text_encoder_pretrained(settings: PretrainSettings) -> bool:
    """Whether this run's text encoder came from `ppd toy pretrain-text` (given now, or recorded by the resumed run)."""
    if settings.text_encoder_from is not None:
        return True
    if settings.resume_from is None:
        return False
    record = read_record(settings.resume_from)
    # `text_encoder_pretrained` carries the fact down a chain of chunks; older records only name the first chunk's source
    return bool(record.get("text_encoder_pretrained") or record.get("settings", {}).get("text_encoder_from"))


def pretrain_toy_base(
    cfg: PPDConfig,
    settings: PretrainSettings,
    out: Path,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train (or continue training) the toy base up to `settings.steps`; save the EMA networks and the resume state."""
    if cfg.model.architecture != "tiny":
        raise ValueError("the toy base is the tiny architecture (model.architecture=tiny)")
    nets = _Networks(cfg, settings)
    codec = ToyCodec.for_stage_c(nets.unet.config)
    image_size = cfg.data.toy.image_size
    if codec.latent_shape(image_size)[1] != cfg.model.latent_size:
        raise ValueError(
            f"data.toy.image_size={image_size} gives {codec.latent_shape(image_size)} latents but model.latent_size="
            f"{cfg.model.latent_size}"
        )
    # Steps the text encoder still trains with the prior: none when it was pretrained on its own, in this run or in
    # the run being continued (a resume must not start training a frozen encoder again).
    text_pretrained = _text_encoder_pretrained(settings)
    text_steps = 0 if text_pretrained else settings.text_encoder_steps
    captions = caption_grammar()
    clip_img = torch.zeros(settings.batch_size, 1, nets.unet.config.clip_image_in_channels)
    began, first_step = time.monotonic(), nets.step
    with _stop_on_interrupt() as interrupted:  # Ctrl-C: stop between two whole steps, then save
        while nets.step < settings.steps:
            if interrupted.is_set():
                break
            if settings.max_seconds is not None and time.monotonic() - began > settings.max_seconds:
                break
            if settings.stop_at is not None and nets.step >= settings.stop_at:
                break
            for group in nets.optimizer.param_groups:
                group["lr"] = learning_rate(settings, nets.step)
            index = nets.rng.integers(0, len(captions), settings.batch_size)
            batch_captions = [captions[i] for i in index]
            images = render(batch_captions, sample_scene_params(nets.rng, settings.batch_size), image_size)
            latents = codec.encode(images_to_unit_range(images))  # [B, C, h, w]
            dropped = nets.rng.random(settings.batch_size) < settings.caption_dropout
            text = [
                UNCONDITIONAL_CAPTION if drop else caption
                for drop, caption in zip(dropped, batch_captions, strict=True)
            ]
            if nets.step < text_steps:
                hidden, pooled = nets.encode(nets.text_encoder, text)  # gradients reach the text encoder
            else:
                hidden, pooled = nets.frozen_text(text, nets.step == text_steps)
            timestep_ratio = torch.rand(settings.batch_size)
            noise = torch.randn_like(latents)
            noise_pred = nets.unet(
                sample=add_noise(latents, noise, timestep_ratio),
                timestep_ratio=timestep_ratio,
                clip_text_pooled=pooled,
                clip_text=hidden,
                clip_img=clip_img,
                return_dict=False,
            )[0]
            error = (noise_pred - noise).pow(2).mean(dim=(1, 2, 3))  # [B]
            weights = min_snr_weights(timestep_ratio, settings.min_snr_gamma)  # [B]
            loss = (error * weights).sum() / weights.sum()
            nets.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nets.parameters, 1.0)
            nets.optimizer.step()
            nets.step += 1
            decay = min(settings.ema_decay, (1 + nets.step) / (10 + nets.step))  # short memory early on
            text_training = nets.step <= text_steps  # the step just taken updated the text encoder
            with torch.no_grad():
                pairs = (
                    ((nets.ema_unet, nets.unet), (nets.ema_text, nets.text_encoder))
                    if text_training
                    else ((nets.ema_unet, nets.unet),)
                )
                for ema, live in pairs:
                    for ema_param, param in zip(ema.parameters(), live.parameters(), strict=True):
                        ema_param.lerp_(param, 1 - decay)
            nets.losses.append(float(error.detach().mean()))
            if progress is not None and (nets.step % 100 == 0 or nets.step == settings.steps):
                progress(nets.step, float(np.mean(nets.losses[-100:])))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nets.ema_unet.save_pretrained(out / "prior", safe_serialization=True)
    nets.ema_text.save_pretrained(out / "text_encoder", safe_serialization=True)
    nets.tokenizer.save_pretrained(out / "tokenizer")
    nets.save_state(out / TRAINING_STATE)
    summary = {
        "steps_done": nets.step,
        "interrupted": interrupted.is_set(),
        "text_encoder_pretrained": text_pretrained,
        "steps_target": settings.steps,
        "finished": nets.step >= settings.steps,
        "steps_this_run": nets.step - first_step,
        "seconds_this_run": round(time.monotonic() - began, 1),
        "final_loss": float(np.mean(nets.losses[-100:])) if nets.losses else float("nan"),
        "image_size": image_size,
        "latent_shape": list(codec.latent_shape(image_size)),
        "unconditional_caption": UNCONDITIONAL_CAPTION,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
    }
    previous = read_record(settings.resume_from) if settings.resume_from is not None else {}
    summary["seconds_total"] = round(previous.get("seconds_total", 0.0) + summary["seconds_this_run"], 1)
    write_record(out, summary)
    return summary


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """A first Ctrl-C (SIGINT) asks the run to stop after the step in progress, so that the base and its resume state
    are saved as with --max-minutes; a second one aborts at once. Outside the main thread (no signal handlers there)
    Ctrl-C keeps its usual meaning."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def on_interrupt(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        logger.warning("stopping after this step and saving the base (Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def write_record(directory: Path, record: dict) -> None:
    """Write (replace) the base's pretraining.json."""
    (Path(directory) / PRETRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def read_record(directory: Path) -> dict:
    """The base's pretraining.json ({} when the base has none)."""
    path = Path(directory) / PRETRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}
