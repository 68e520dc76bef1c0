"""The decoupled user adapter: exactness of the reference (s = 0 / adapter off), Eq. 7, per-row users, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

from ppd.models.adapter import AdapterConfig, PersonalizedStageC, UserAdapter
from ppd.models.checkpoint import AdapterCheckpointError, load_adapter, save_adapter
from ppd.models.stage_c import attention_blocks, build_stage_c

EMBEDDING_SHAPE = (3, 16)  # [L, d]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(init: str = "zero_value", seed: int = 0) -> tuple[PersonalizedStageC, torch.nn.Module]:
    """A tiny personalised Stage C and an untouched copy of its base (stock attention processors)."""
    torch.manual_seed(seed)
    base = build_stage_c("tiny")
    pristine = copy.deepcopy(base).eval()
    config = AdapterConfig(
        embedding_layers=EMBEDDING_SHAPE[0],
        embedding_dim=EMBEDDING_SHAPE[1],
        user_tokens=4,
        conditioning_dim=base.config.conditioning_dim,
        init=init,
    )
    return PersonalizedStageC(base, UserAdapter(config, base)), pristine


def _inputs(batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 12, 8, 8, generator=generator),
        "timestep_ratio": torch.rand(batch, generator=generator),
        "clip_text_pooled": torch.randn(batch, 1, 32, generator=generator),
        "clip_text": torch.randn(batch, 10, 32, generator=generator),
    }


def _base_output(pristine: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    clip_img = torch.zeros(inputs["sample"].shape[0], 1, 32)
    with torch.no_grad():
        return pristine(**inputs, clip_img=clip_img).sample


def _randomise_values(model: PersonalizedStageC) -> None:
    # Stands in for a trained adapter: zero-init W'_v would hide every effect of the user branch.
    with torch.no_grad():
        for user_kv in model.adapter.user_kv.values():
            user_kv.to_v.weight.normal_(std=0.2)


def test_adapter_off_equals_base_model() -> None:
    model, pristine = _model()
    _randomise_values(model)
    inputs = _inputs()
    with torch.no_grad():
        off = model(**inputs, user_embedding=None)
    assert torch.equal(off, _base_output(pristine, inputs))


def test_zero_value_init_starts_at_the_base_model() -> None:
    model, pristine = _model()
    inputs = _inputs()
    with torch.no_grad():
        personalised = model(**inputs, user_embedding=torch.randn(3, *EMBEDDING_SHAPE))
    assert (personalised - _base_output(pristine, inputs)).abs().max() <= 1e-6


def test_scale_zero_equals_base_and_scale_one_does_not() -> None:
    model, pristine = _model()
    _randomise_values(model)
    inputs = _inputs()
    users = torch.randn(3, *EMBEDDING_SHAPE)
    base_out = _base_output(pristine, inputs)
    with torch.no_grad():
        at_zero = model(**inputs, user_embedding=users, user_scale=0.0)
        at_one = model(**inputs, user_embedding=users, user_scale=1.0)
    assert (at_zero - base_out).abs().max() <= 1e-6
    assert (at_one - base_out).abs().max() > 1e-3


def test_output_follows_the_user_only_when_the_branch_is_on() -> None:
    model, _ = _model()
    _randomise_values(model)
    inputs = _inputs()
    user_a, user_b = torch.randn(3, *EMBEDDING_SHAPE), torch.randn(3, *EMBEDDING_SHAPE)
    with torch.no_grad():
        differ = (model(**inputs, user_embedding=user_a) - model(**inputs, user_embedding=user_b)).abs().max()
        same = (
            (
                model(**inputs, user_embedding=user_a, user_scale=0.0)
                - model(**inputs, user_embedding=user_b, user_scale=0.0)
            )
            .abs()
            .max()
        )
    assert differ > 1e-3
    assert same == 0


def test_per_row_users_and_scales_equal_rows_run_alone() -> None:
    model, pristine = _model()
    _randomise_values(model)
    inputs = _inputs(batch=3)
    users = torch.randn(3, *EMBEDDING_SHAPE)
    scales = torch.tensor([1.0, 0.5, 0.0])
    with torch.no_grad():
        batched = model(**inputs, user_embedding=users, user_scale=scales)
        for row in range(3):
            alone = model(
                **{k: v[row : row + 1] for k, v in inputs.items()},
                user_embedding=users[row : row + 1],
                user_scale=float(scales[row]),
            )
            assert torch.allclose(batched[row : row + 1], alone, atol=1e-5)
    assert (batched[2] - _base_output(pristine, inputs)[2]).abs().max() <= 1e-6


def test_one_block_computes_eq7() -> None:
    """out = to_out(softmax(QKᵀ/√d)V + s·softmax(QK'ᵀ/√d)V'), written out head by head."""
    model, _ = _model()
    _randomise_values(model)
    path, block = attention_blocks(model.base)[0]
    attention = block.attention
    user_kv = model.adapter.user_kv[path.replace(".", "_")]
    generator = torch.Generator().manual_seed(3)
    batch, width, side, tokens = 2, 64, 4, 5
    norm_x = torch.randn(batch, width, side, side, generator=generator)
    context = torch.randn(batch, side * side + tokens, width, generator=generator)
    user_tokens = torch.randn(batch, 4, 64, generator=generator)
    scale = 0.7
    with torch.no_grad(), model.adapter.user_condition(user_tokens, scale):
        processed = attention(norm_x, encoder_hidden_states=context)

        queries_in = norm_x.flatten(2).transpose(1, 2)  # [B, HW, c]
        heads, head_dim = attention.heads, width // attention.heads
        expected_heads = []
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            q = queries_in @ attention.to_q.weight[cols].T + attention.to_q.bias[cols]
            k = context @ attention.to_k.weight[cols].T + attention.to_k.bias[cols]
            v = context @ attention.to_v.weight[cols].T + attention.to_v.bias[cols]
            k_user = user_tokens @ user_kv.to_k.weight[cols].T
            v_user = user_tokens @ user_kv.to_v.weight[cols].T
            text_part = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1) @ v
            user_part = torch.softmax(q @ k_user.transpose(1, 2) / math.sqrt(head_dim), dim=-1) @ v_user
            expected_heads.append(text_part + scale * user_part)
        merged = torch.cat(expected_heads, dim=-1)  # [B, HW, c]
        expected = merged @ attention.to_out[0].weight.T + attention.to_out[0].bias
        expected = expected.transpose(1, 2).reshape(batch, width, side, side)
    assert torch.allclose(processed, expected, atol=1e-5)


def test_copy_text_kv_init_composes_the_text_path() -> None:
    model, _ = _model(init="copy_text_kv")
    for path, block in attention_blocks(model.base):
        user_kv = model.adapter.user_kv[path.replace(".", "_")]
        mapper = block.kv_mapper[1].weight  # [c, c_cond]
        assert torch.allclose(user_kv.to_k.weight, block.attention.to_k.weight @ mapper)
        assert torch.allclose(user_kv.to_v.weight, block.attention.to_v.weight @ mapper)


def test_zero_embedding_is_the_learned_unconditional_user() -> None:
    model, _ = _model()
    projection = model.adapter.projection
    with torch.no_grad():
        projection.bias.normal_()
        tokens = model.adapter.project(torch.zeros(2, *EMBEDDING_SHAPE))  # [2, T_u, c_cond]
        expected = torch.nn.functional.layer_norm(
            projection.bias, (64,), projection.norm.weight, projection.norm.bias, projection.norm.eps
        )
    assert torch.allclose(tokens[0], expected, atol=1e-6) and torch.allclose(tokens[1], expected, atol=1e-6)


def test_frozen_base_keeps_its_own_state_dict_and_only_adapter_trains() -> None:
    model, pristine = _model()
    assert set(model.base.state_dict()) == set(pristine.state_dict())  # no adapter weights inside the UNet
    assert all(not p.requires_grad for p in model.base.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.adapter.parameters()}
    model.train()
    assert not model.base.training  # the frozen base never runs dropout


def test_wrong_embedding_shape_is_rejected() -> None:
    model, _ = _model()
    with pytest.raises(ValueError, match=r"\[B, 3, 16\]"):
        model(**_inputs(), user_embedding=torch.randn(3, 2, 16))


def test_checkpoint_round_trip_restores_the_same_outputs(tmp_path) -> None:
    model, _ = _model(seed=0)
    _randomise_values(model)
    save_adapter(
        model, tmp_path / "ckpt", architecture="tiny", base_model="tiny", train_method="ppd", extra={"step": 3}
    )
    fresh, _ = _model(seed=0)  # same base, fresh adapter
    with torch.no_grad():
        for parameter in fresh.adapter.parameters():
            parameter.normal_()
    meta = load_adapter(fresh, tmp_path / "ckpt", architecture="tiny")
    inputs, users = _inputs(), torch.randn(3, *EMBEDDING_SHAPE)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs, user_embedding=users), model(**inputs, user_embedding=users))
    assert meta.embedding_shape == EMBEDDING_SHAPE and meta.extra == {"step": 3}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_checkpoint_loader_refuses_anything_else(tmp_path) -> None:
    model, _ = _model()
    ckpt = save_adapter(model, tmp_path / "ok", architecture="tiny", base_model="tiny", train_method="ppd")

    pickle_file = tmp_path / "adapter.pt"
    pickle_file.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterCheckpointError, match="pickle"):
        load_adapter(model, pickle_file)

    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    save_file({"x": torch.zeros(1)}, str(weights_only / "adapter.safetensors"))
    with pytest.raises(AdapterCheckpointError, match="missing adapter_config.json"):
        load_adapter(model, weights_only)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((ckpt / "adapter_config.json").read_text())
    (corrupt / "adapter.safetensors").write_bytes(b"\x80\x04 pickled bytes, not safetensors")
    with pytest.raises(AdapterCheckpointError, match="safetensors"):
        load_adapter(model, corrupt)

    other_format = tmp_path / "other_format"
    other_format.mkdir()
    (other_format / "adapter.safetensors").write_bytes((ckpt / "adapter.safetensors").read_bytes())
    (other_format / "adapter_config.json").write_text('{"format": "something-else"}')
    with pytest.raises(AdapterCheckpointError, match="config"):
        load_adapter(model, other_format)

    torch.manual_seed(0)
    base = build_stage_c("tiny")
    eight_tokens = PersonalizedStageC(
        base,
        UserAdapter(AdapterConfig(embedding_layers=3, embedding_dim=16, user_tokens=8, conditioning_dim=64), base),
    )
    with pytest.raises(AdapterCheckpointError, match="does not match"):
        load_adapter(eight_tokens, ckpt)
    with pytest.raises(AdapterCheckpointError, match="trained on"):
        load_adapter(model, ckpt, architecture="stage_c_lite")


def test_the_user_projection_can_learn_faster_than_the_key_values() -> None:
    def first_step(scale: float) -> dict[str, torch.Tensor]:
        model, _ = _model(seed=3)
        _randomise_values(model)  # non-zero W'_v: the projection gets a gradient from the first step on
        before = {name: p.detach().clone() for name, p in model.adapter.named_parameters()}
        optimizer = torch.optim.Adam(model.optimizer_groups(1e-3, scale))
        inputs = _inputs()
        model(**inputs, user_embedding=torch.randn(3, *EMBEDDING_SHAPE)).square().mean().backward()
        optimizer.step()
        return {name: (p.detach() - before[name]).abs().max() for name, p in model.adapter.named_parameters()}

    model = _model()[0]
    assert len(model.optimizer_groups(1e-3, 1.0)) == 1
    grouped = [set(map(id, g["params"])) for g in model.optimizer_groups(1e-3, 4.0)]
    assert len(grouped) == 2 and not grouped[0] & grouped[1]
    assert grouped[0] | grouped[1] == set(map(id, model.trainable_parameters()))
    plain, faster = first_step(1.0), first_step(4.0)
    # Adam's first step moves every parameter with a gradient by ~lr: 4x as far in the projection, as far elsewhere
    for name in plain:
        ratio = float(faster[name] / plain[name]) if plain[name] > 0 else 1.0
        expected = 4.0 if name.startswith("projection.") else 1.0
        assert ratio == pytest.approx(expected, rel=1e-3), name
