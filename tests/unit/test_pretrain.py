"""Toy-base pretraining: chunked runs resume exactly, the saved base loads through the project's loaders (text
encoder included), and the learning-rate and min-SNR schedules do what their docstrings say."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file

from ppd.config import smoke
from ppd.models.factory import load_caption_encoder, load_stage_c
from ppd.train.pretrain import PretrainSettings, learning_rate, min_snr_weights, pretrain_toy_base, read_record


def _weights(directory) -> dict[str, torch.Tensor]:
    return {
        **{f"prior.{k}": v for k, v in load_file(directory / "prior" / "diffusion_pytorch_model.safetensors").items()},
        **{f"text.{k}": v for k, v in load_file(directory / "text_encoder" / "model.safetensors").items()},
    }


def test_two_chunks_equal_one_run_and_the_base_loads(tmp_path):
    cfg = smoke()
    # the text encoder trains for 2 steps, then is frozen: the chunk boundary (step 3) falls after the freeze
    settings = PretrainSettings(steps=4, batch_size=4, warmup_steps=2, seed=3, text_encoder_steps=2)
    whole = pretrain_toy_base(cfg, settings, tmp_path / "whole")
    assert whole["steps_done"] == 4 and whole["finished"]

    half = pretrain_toy_base(cfg, replace(settings, stop_at=3), tmp_path / "half")
    assert half["steps_done"] == 3 and not half["finished"]
    resumed = pretrain_toy_base(cfg, replace(settings, resume_from=tmp_path / "half"), tmp_path / "resumed")
    assert resumed["steps_done"] == 4 and resumed["steps_this_run"] == 1
    # weights, optimiser moments, data stream and noise all continue where they stopped: bit-identical to one run
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c) for k, c in _weights(tmp_path / "half").items())  # chunk 2 did train
    # frozen after step 2: the text encoder saved after steps 3 and 4 is the same one
    text = {k: v for k, v in _weights(tmp_path / "half").items() if k.startswith("text.")}
    assert all(torch.equal(v, a[k]) for k, v in text.items())

    # the saved base is what the project's loaders read: its own text encoder, not the random tiny one
    model_cfg = cfg.model.model_copy(update={"stage_c_path": str(tmp_path / "whole")})
    unet = load_stage_c(model_cfg)
    assert unet.config.in_channels == unet.config.out_channels
    encoder = load_caption_encoder(model_cfg)
    saved = load_file(tmp_path / "whole" / "text_encoder" / "model.safetensors")
    name = next(k for k in saved if k.endswith("token_embedding.weight"))
    assert torch.equal(encoder.text_encoder.state_dict()[name], saved[name])
    record = read_record(tmp_path / "whole")
    assert record["unconditional_caption"] == "" and record["steps_done"] == 4


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = PretrainSettings(steps=1000, lr=1e-3, warmup_steps=100, final_lr_fraction=0.1)
    rates = [learning_rate(settings, step) for step in range(0, 1001)]
    assert rates[0] < rates[50] < rates[99]  # warm-up
    assert max(rates) <= 1e-3 and rates[99] > 0.95e-3  # near lr when the warm-up ends (the decay has begun)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:], strict=False))  # then only decays
    assert abs(rates[1000] - 1e-4) < 1e-12  # ... to the floor at the last step


def test_min_snr_weights_only_cut_low_noise_steps():
    t = torch.tensor([0.02, 0.2, 0.6, 0.95])  # SNR from very high (t small) to very low
    w = min_snr_weights(t, gamma=5.0)
    assert w[2] == 1 and w[3] == 1  # noisy steps keep their full weight
    assert w[0] < w[1] < 1  # the cleaner the input, the smaller the weight
    assert torch.equal(min_snr_weights(t, gamma=0.0), torch.ones(4))


def test_ctrl_c_stops_after_the_step_in_progress_and_saves_a_resumable_base(tmp_path, monkeypatch):
    """A first SIGINT during a step lets that step finish, then the run saves as a time limit would."""
    import os
    import signal

    import ppd.train.pretrain as pretrain

    renders = []

    def render_then_interrupt(*args, **kwargs):
        renders.append(1)
        if len(renders) == 2:  # during step 2: the user presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return real_render(*args, **kwargs)

    real_render = pretrain.render
    monkeypatch.setattr(pretrain, "render", render_then_interrupt)
    cfg = smoke()
    settings = PretrainSettings(steps=4, batch_size=4, warmup_steps=2, seed=3, text_encoder_steps=2)
    handler_before = signal.getsignal(signal.SIGINT)
    stopped = pretrain_toy_base(cfg, settings, tmp_path / "stopped")
    assert stopped["interrupted"] and stopped["steps_done"] == 2 and not stopped["finished"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C means what it meant before the run
    monkeypatch.setattr(pretrain, "render", real_render)
    resumed = pretrain_toy_base(cfg, replace(settings, resume_from=tmp_path / "stopped"), tmp_path / "resumed")
    assert resumed["steps_done"] == 4 and resumed["steps_this_run"] == 2 and not resumed["interrupted"]
