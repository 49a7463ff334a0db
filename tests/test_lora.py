import pytest
import torch
from torch import nn

from mos.common.lora import (
    LoRALinear,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    remove_lora,
    target_layer_names,
)


def _unet_out(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, base.text_dim, generator=g)
    return base.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def test_lora_is_a_noop_at_step_zero(tiny):
    ids = tiny.tokenizer(["a photo of a dog"], padding="max_length", return_tensors="pt").input_ids
    before_unet, before_te = _unet_out(tiny), tiny.text_encoder(ids)[0]
    for _, model, targets in tiny.lora_components():
        layers = inject_lora(model, targets, rank=4)
        for layer in layers.values():
            assert torch.count_nonzero(layer.lora_B.weight) == 0
            assert torch.count_nonzero(layer.lora_A.weight) > 0
            assert layer.scale == 1.0 and layer.rank == 4
    assert torch.equal(_unet_out(tiny), before_unet)
    assert torch.equal(tiny.text_encoder(ids)[0], before_te)


def test_targets_match_the_method(tiny):
    te_prefix, te, te_targets = tiny.lora_components()[0]
    te_names = target_layer_names(te, te_targets)
    assert len(te_names) == 4 * te.config.num_hidden_layers
    unet_names = target_layer_names(tiny.unet, tiny.lora_components()[1][2])
    # to_q/to_k/to_v/to_out.0 of attn1 and attn2 in every transformer block; no VAE, no resnets
    n_blocks = sum(1 for n, _ in tiny.unet.named_modules() if n.endswith("transformer_blocks.0"))
    assert len(unet_names) == n_blocks * 2 * 4
    assert all((".attn1." in n or ".attn2." in n) for n in unet_names)


def test_update_is_scale_times_b_a_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 6)
    brute = x @ (base.weight + lora.lora_B.weight @ lora.lora_A.weight).T + base.bias
    assert torch.allclose(lora(x), brute, atol=1e-6)
    lora.scale = 0.5
    brute_half = x @ (base.weight + 0.5 * lora.lora_B.weight @ lora.lora_A.weight).T + base.bias
    assert torch.allclose(lora(x), brute_half, atol=1e-6)
    merged = LoRALinear(nn.Linear(6, 5), rank=2)
    merged.load_state_dict(lora.state_dict())
    merged.scale = 0.5
    expected = merged(x)
    plain = merged.to_linear(merge=True)
    assert type(plain) is nn.Linear and torch.allclose(plain(x), expected, atol=1e-6)


def test_state_dict_names_and_strict_loading(tiny):
    prefix, te, targets = tiny.lora_components()[0]
    inject_lora(te, targets, rank=4)
    sd = lora_state_dict(te, prefix)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in sd)
    assert {k.rsplit(".", 2)[-2] for k in sd} == {"lora_A", "lora_B"}
    shape = sd[next(k for k in sd if k.endswith("q_proj.lora_A.weight"))].shape
    assert shape == (4, tiny.text_dim)
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(te, dict(list(sd.items())[1:]), prefix)
    bad = {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in sd.items()}
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(te, bad, prefix)
    assert remove_lora(te) == len(sd) // 2
    assert not any(isinstance(m, LoRALinear) for m in te.modules())


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=4)


def test_batched_adapters_apply_one_adapter_per_batch_chunk():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(6, 5), rank=2)
    ups = [torch.randn(5, 2), torch.randn(5, 3)]  # ranks may differ
    downs = [torch.randn(2, 6), torch.randn(3, 6)]
    x = torch.randn(4, 7, 6)  # chunk 0: rows 0-1, chunk 1: rows 2-3
    lin.set_batched(ups, downs)
    got = lin(x)
    for k in range(2):
        want = x[2 * k : 2 * k + 2] @ (lin.weight + ups[k] @ downs[k]).T + lin.bias
        assert torch.allclose(got[2 * k : 2 * k + 2], want, atol=1e-5)
    lin.set_factors(None, None)  # switches the batched adapters off too
    assert torch.allclose(lin(x), x @ lin.weight.T + lin.bias, atol=1e-6)
