"""fusedlm.nn modules: Hugging Face / PEFT state dicts load unchanged and give the same outputs.

Each module is checked against its counterpart (transformers' Llama modules with a tiny config,
torch.nn.LayerNorm, PEFT's LoRA layer) on the backends usable here, forward and gradients.
"""
import pytest
import torch

import fusedlm
import fusedlm.nn as fnn
from fusedlm.verify import rel_err


def tiny_llama_config(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=1, vocab_size=32, max_position_embeddings=64, rope_theta=10000.0)
    args.update(kw)
    return transformers.LlamaConfig(**args)


def assert_same_grads(ours, our_inputs, theirs, their_inputs):
    dy = torch.randn_like(theirs)
    got = torch.autograd.grad(ours, our_inputs, dy)
    want = torch.autograd.grad(theirs, their_inputs, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


# --- norms ------------------------------------------------------------------------------------------


def test_rms_norm_loads_llama_rmsnorm(backend, device):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf = modeling.LlamaRMSNorm(96, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.normal_()
    ours = fnn.RMSNorm(96, eps=1e-5).to(device)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 7, 96, device=device, requires_grad=True)
    with fusedlm.use_backend(backend):
        y = ours(x)
    want = hf(x)
    assert rel_err(y, want) < 1e-5
    assert_same_grads(y, [x, ours.weight], want, [x, hf.weight])


def test_rms_norm_weight_gradient(backend, device):
    ours = fnn.RMSNorm(40).to(device)
    with torch.no_grad():
        ours.weight.normal_()
    x = torch.randn(3, 40, device=device)
    with fusedlm.use_backend(backend):
        ours(x).square().sum().backward()
    w = ours.weight.detach().double().requires_grad_(True)
    x64 = x.double()
    y64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w
    (gw,) = torch.autograd.grad(y64.square().sum(), w)
    assert rel_err(ours.weight.grad, gw) < 1e-5


def test_rms_norm_gemma_offset_and_residual(backend, device):
    ours = fnn.RMSNorm(40, eps=1e-6, offset=1.0).to(device)
    assert torch.equal(ours.weight, torch.zeros(40, device=device))  # Gemma starts at zeros: (1 + 0)
    with torch.no_grad():
        ours.weight.normal_()
    x, r = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    with fusedlm.use_backend(backend):
        y, s = ours(x, residual=r)
    s64 = (x + r).double()
    want = s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + 1e-6) * (1.0 + ours.weight.double())
    assert torch.equal(s, x + r)
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_loads_torch_layernorm(backend, device, bias):
    theirs = torch.nn.LayerNorm(96, eps=1e-5, bias=bias).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
        if bias:
            theirs.bias.normal_()
    ours = fnn.LayerNorm(96, eps=1e-5, bias=bias).to(device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 96, device=device, requires_grad=True)
    with fusedlm.use_backend(backend):
        y = ours(x)
    want = theirs(x)
    assert rel_err(y, want) < 1e-5
    assert_same_grads(y, [x, ours.weight] + ([ours.bias] if bias else []),
                      want, [x, theirs.weight] + ([theirs.bias] if bias else []))


# --- rotary -------------------------------------------------------------------------------------------


def test_rotary_matches_llama_rotary_embedding(device):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    cfg = tiny_llama_config(rope_theta=500000.0, max_position_embeddings=64)
    hf = modeling.LlamaRotaryEmbedding(cfg).to(device)
    ours = fnn.RotaryEmbedding(16, max_position_embeddings=64, base=500000.0).to(device)
    assert ours.state_dict() == {} and hf.state_dict() == {}  # nothing persistent on either side
    pos = torch.tensor([[0, 1, 2, 5, 63], [7, 3, 3, 40, 0]], device=device)
    cos, sin = ours(pos)
    hcos, hsin = hf(torch.zeros(1, device=device), pos)
    assert cos.shape == (2, 5, 16) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, hcos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hsin, rtol=0, atol=1e-6)
    cos1, sin1 = ours(pos[1])  # (S,) -> (S, dim)
    assert cos1.shape == (5, 16)
    assert torch.equal(cos1, cos[1]) and torch.equal(sin1, sin[1])


def test_rotary_feeds_apply_rotary_pos_emb(backend, device):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    rope = fnn.RotaryEmbedding(16, max_position_embeddings=32).to(device)
    q, k = torch.randn(2, 4, 9, 16, device=device), torch.randn(2, 2, 9, 16, device=device)
    pos = torch.arange(9, device=device).expand(2, 9)
    cos, sin = rope(pos)
    got = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    want = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


def test_rotary_cache_follows_dtype_and_device_and_grows(device):
    rope = fnn.RotaryEmbedding(8, max_position_embeddings=4).to(device)
    full = fnn.RotaryEmbedding(8, max_position_embeddings=100).to(device)
    pos = torch.tensor([1, 3, 99], device=device)  # past the table: grown in eager mode
    cos, sin = rope(pos)
    assert rope.cos_cached.shape[0] == 100
    assert torch.equal(cos, full(pos)[0]) and torch.equal(sin, full(pos)[1])
    half = rope.to(torch.float16)
    hcos, hsin = half(pos)
    assert hcos.dtype == torch.float16 and hcos.device == pos.device
    assert torch.equal(hcos, cos.half()) and torch.equal(hsin, sin.half())
    far = torch.tensor([150], device=device)
    fcos, _ = half(far)  # grown in the module's current dtype, from float32 values
    assert fcos.dtype == torch.float16
    assert torch.equal(fcos, full(far)[0].half())


def test_rotary_bad_positions(device):
    rope = fnn.RotaryEmbedding(8).to(device)
    with pytest.raises(TypeError, match="positions: expected an integer tensor"):
        rope(torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="positions: expected positions >= 0"):
        rope(torch.tensor([0, -1], device=device))
    with pytest.raises(ValueError, match="positions: expected a 1-D"):
        rope(torch.zeros(1, 2, 3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="dim: expected an even"):
        fnn.RotaryEmbedding(7)


def test_rotary_compiles_fullgraph(device):
    rope = fnn.RotaryEmbedding(16, max_position_embeddings=64).to(device)
    pos = torch.arange(10, device=device)[None].expand(2, 10)
    compiled = torch.compile(rope, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    for g, e in zip(compiled(pos), rope(pos)):
        assert torch.equal(g, e)


# --- MLP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_loads_llama_mlp(backend, device, bias):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf = modeling.LlamaMLP(tiny_llama_config(mlp_bias=bias)).to(device)
    ours = fnn.SwiGLUMLP(64, 80, bias=bias).to(device)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    with fusedlm.use_backend(backend):
        y = ours(x)
    want = hf(x)
    assert rel_err(y, want) < 1e-5
    assert_same_grads(y, [x, ours.gate_proj.weight, ours.up_proj.weight, ours.down_proj.weight],
                      want, [x, hf.gate_proj.weight, hf.up_proj.weight, hf.down_proj.weight])


# --- LoRA -----------------------------------------------------------------------------------------------


def peft_layer(device, k=96, n=40, r=8, alpha=16, bias=True, dropout=0.0):
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)).to(device)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"],
                                                    lora_dropout=dropout))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # PEFT initialises B to zeros: make the adapter matter
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_module_matches_peft(backend, device, bias):
    theirs = peft_layer(device, bias=bias)
    ours = fnn.LoRALinear(96, 40, r=8, alpha=16, bias=bias).to(device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert ours.scaling == theirs.scaling["default"]
    x = torch.randn(3, 11, 96, device=device, requires_grad=True)
    with fusedlm.use_backend(backend):
        y = ours(x)
    want = theirs(x)
    assert rel_err(y, want) < 1e-6
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, ours.lora_A["default"].weight, ours.lora_B["default"].weight], dy)
    exp = torch.autograd.grad(want, [x, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight], dy)
    for g, e in zip(got, exp):
        assert rel_err(g, e) < 1e-6


def test_our_state_dict_loads_into_peft(device):
    theirs = peft_layer(device)
    ours = fnn.LoRALinear(96, 40, r=8, alpha=16).to(device)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 96, device=device)
    assert rel_err(ours(x), theirs(x)) < 1e-6


def test_from_linear_wraps_and_starts_as_the_linear(backend, device):
    lin = torch.nn.Linear(40, 24).to(device)
    ours = fnn.LoRALinear.from_linear(lin, r=4, alpha=8, dropout=0.1)
    assert ours.base_layer is lin and ours.weight is lin.weight  # shared, not copied
    assert ours.scaling == 2.0 and ours.dropout_p == 0.1
    assert torch.equal(ours.lora_B["default"].weight, torch.zeros(24, 4, device=device))
    assert ours.lora_A["default"].weight.abs().sum() > 0
    x = torch.randn(6, 40, device=device)
    ours.eval()
    with fusedlm.use_backend(backend):
        assert rel_err(ours(x), lin(x)) < 1e-6


def test_merge_unmerge_round_trip(backend, device):
    theirs = peft_layer(device)
    ours = fnn.LoRALinear.from_linear(torch.nn.Linear(96, 40).to(device), r=8, alpha=16)
    ours.load_state_dict(theirs.state_dict())
    w0 = ours.weight.detach().clone()
    x = torch.randn(7, 96, device=device)
    with fusedlm.use_backend(backend):
        before = ours(x)
        ours.merge()
        assert ours.merged
        merged_out = ours(x)
        ours.merge()  # no-op when merged
        theirs.merge()  # PEFT's merge gives the same weight
        assert rel_err(ours.weight, theirs.base_layer.weight) < 1e-6
        with torch.no_grad():  # merged: the forward is a plain linear, the adapter no longer read
            ours.lora_B["default"].weight.mul_(3.0)
        assert torch.equal(ours(x), merged_out)
        with torch.no_grad():
            ours.lora_B["default"].weight.div_(3.0)
        ours.unmerge()
        assert not ours.merged
        after = ours(x)
        ours.unmerge()  # no-op when not merged
    assert rel_err(merged_out, before) < 1e-6
    assert rel_err(after, before) < 1e-6
    assert not torch.equal(w0, theirs.base_layer.weight)  # the merge did change a weight
    torch.testing.assert_close(ours.weight, w0, rtol=0, atol=1e-6)


def test_dropout_in_training_only(backend, device):
    ours = fnn.LoRALinear(40, 24, r=8, alpha=8, dropout=0.5).to(device)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_()
    x = torch.randn(16, 40, device=device)
    with fusedlm.use_backend(backend):
        ours.eval()
        eval_out = ours(x)
        assert torch.equal(ours(x), eval_out)
        ours.train()
        torch.manual_seed(5)
        a = ours(x)
        torch.manual_seed(5)
        b = ours(x)
        torch.manual_seed(6)
        c = ours(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert rel_err(a, eval_out) > 1e-3  # dropout did act on the adapter's branch


def test_float32_adapter_on_half_base(backend, device):
    """PEFT keeps adapters in float32 under a half-precision base: gradients come back in float32."""
    lin = torch.nn.Linear(40, 24).to(device=device, dtype=torch.float16)
    ours = fnn.LoRALinear.from_linear(lin, r=4, alpha=4)
    ours.lora_A.float()
    ours.lora_B.float()
    x = torch.randn(5, 40, device=device, dtype=torch.float16)
    with fusedlm.use_backend(backend):
        y = ours(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert ours.lora_A["default"].weight.grad.dtype == torch.float32
    assert ours.lora_B["default"].weight.grad.dtype == torch.float32


def test_lora_under_autocast(backend, device):
    """float32 parameters under autocast (mixed-precision training): computed in the autocast dtype."""
    ours = fnn.LoRALinear(40, 24, r=4, alpha=8).to(device)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_()
    x = torch.randn(6, 40, device=device)
    want = ours(x).detach()
    with fusedlm.use_backend(backend), torch.autocast(device, dtype=torch.float16):
        y = ours(x)
    assert y.dtype == torch.float16
    assert rel_err(y, want) < 4 * 2.0**-11
    y.float().sum().backward()
    assert ours.lora_A["default"].weight.grad.dtype == torch.float32


def test_lora_module_compiles_fullgraph(backend, device):
    ours = fnn.LoRALinear(40, 24, r=4, alpha=8).to(device)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_()
    x = torch.randn(3, 40, device=device)
    with fusedlm.use_backend(backend):
        eager = ours(x)
        compiled = torch.compile(ours, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_lora_bad_arguments():
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        fnn.LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1), r=2, alpha=2)
    with pytest.raises(ValueError, match="r: expected a positive integer rank"):
        fnn.LoRALinear.from_linear(torch.nn.Linear(4, 4), r=0, alpha=2)
    with pytest.raises(ValueError, match="dropout: expected a probability"):
        fnn.LoRALinear(4, 4, r=2, alpha=2, dropout=1.0)
