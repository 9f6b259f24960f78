"""fusedlm.integrations.hf: register() / attn_implementation="fusedlm" and patch_model on tiny random
transformers models (and a PEFT LoRA model), against the same weights run by transformers' eager path.

Tolerances: float32 throughout, errors relative in norm; the fused ops reorder float32 sums (softmax,
norms), which moves results by a few 1e-7; 1e-5 leaves room for that and for nothing else.
Padded query rows are compared nowhere: transformers gives them uniform attention, fusedlm attends the
real keys or outputs zeros (both unspecified), and no real token ever reads them.
"""
import contextlib
import copy
import subprocess
import sys

import pytest
import torch

import fusedlm

transformers = pytest.importorskip("transformers")

from fusedlm.integrations import hf  # noqa: E402
from fusedlm.integrations.hf_compat import cache_keyword  # noqa: E402
from helpers import triton_or_skip  # noqa: E402
from hf_helpers import (assert_close as _assert_close, assert_same_run as _assert_same_run,  # noqa: E402
                        batch as _batch, config_for as _config, main_output as _main, models as _models,
                        original_rotary, run as _run)

EXPECTED = {  # counts patch_model must report for the 2-layer models
    "llama": dict(attention=2, rms_norm=5, residual_norm=2, swiglu=2, rotary=2, linear_cross_entropy=1),
    "mistral": dict(attention=2, rms_norm=5, residual_norm=2, swiglu=2, rotary=2, linear_cross_entropy=1),
    "qwen2": dict(attention=2, rms_norm=5, residual_norm=2, swiglu=2, rotary=2, linear_cross_entropy=1),
    "bert": dict(attention=2, layer_norm=5, residual_norm=4),
    "roberta": dict(attention=2, layer_norm=5, residual_norm=4),
    "deberta_v3": dict(deberta_attention=2, layer_norm=6, residual_norm=4),  # + the relative-embedding norm
    "deberta_v2": dict(deberta_attention=2, layer_norm=5, residual_norm=4),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_patch_model_padded_outputs_and_grads(family):
    fusedlm.set_backend("torch")
    ref, model = _models(family)
    keys = list(model.state_dict())
    counts = hf.patch_model(model)
    assert {k: v for k, v in counts.items() if v} == EXPECTED[family]
    assert list(model.state_dict()) == keys
    for side in ("left", "right"):
        ids, mask = _batch(side)
        real = mask.bool()
        _assert_same_run(_run(ref, real, reference=True, input_ids=ids, attention_mask=mask),
                         _run(model, real, input_ids=ids, attention_mask=mask), real)
    assert all(v == 0 for v in hf.patch_model(model).values())  # a second call changes nothing


SEGMENTS = (5, 3, 1)  # one packed row of three sequences; the first is longer than Mistral's window


@pytest.mark.parametrize("family,flash_kwargs", [("llama", False), ("llama", True), ("mistral", False),
                                                 ("bert", False)])
def test_patch_model_packed_equals_separate_sequences(family, flash_kwargs):
    """A padding-free row (position ids restarting, or cu_seq_lens_* as FlashAttention takes them) gives
    each sequence what it gets alone, outputs and gradients."""
    fusedlm.set_backend("torch")
    ref, model = _models(family)
    hf.patch_model(model)
    ids = torch.randint(2, 64, (1, sum(SEGMENTS)))
    positions = torch.cat([torch.arange(n) for n in SEGMENTS])[None]
    extra = {}
    if flash_kwargs:
        cu = torch.tensor([0, 5, 8, 9], dtype=torch.int32)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    real = torch.ones(1, sum(SEGMENTS), dtype=torch.bool)
    fused = _run(model, real, input_ids=ids, position_ids=positions, **extra)

    ref.zero_grad(set_to_none=True)
    with original_rotary(ref):
        out = torch.cat([_main(ref(input_ids=part)) for part in ids.split(SEGMENTS, dim=1)], dim=1)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    separate = out.detach(), {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    _assert_same_run(separate, fused, real)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attn_implementation_fusedlm_at_construction(family):
    fusedlm.set_backend("torch")
    hf.register()
    hf.register()  # idempotent
    cfg, auto = _config(family)
    ref, _ = _models(family)
    model = auto.from_config(cfg, attn_implementation="fusedlm").eval()
    assert model.config._attn_implementation == "fusedlm"
    model.load_state_dict(ref.state_dict())
    ids, mask = _batch("left")
    real = mask.bool()
    with torch.no_grad(), original_rotary(ref):
        expected = _main(ref(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        _assert_close(_main(model(input_ids=ids, attention_mask=mask))[real], expected[real], "output")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_greedy_equals_unpatched(family):
    """KV-cache decoding (one query against the cache, the window sliding past the prompt) gives the
    unpatched model's greedy tokens, for a left-padded batch."""
    fusedlm.set_backend("torch")
    ref, model = _models(family)
    hf.patch_model(model)
    ids, mask = _batch("left", S=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with original_rotary(ref):
        expected = ref.generate(ids, **kw)
    assert torch.equal(model.generate(ids, **kw), expected)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("side", ["none", "left"])
def test_several_new_tokens_against_a_cache(family, side):
    """L > 1 queries after a cached prefix: causal aligned bottom-right (the queries are the last L)."""
    fusedlm.set_backend("torch")
    ref, model = _models(family)
    hf.patch_model(model)
    ids, mask = _batch("left", S=10)
    if side == "none":
        mask = torch.ones_like(mask)
    outs = []
    keyword = cache_keyword(ref.forward)  # "past_key_values" before transformers 5.2x, then "cache"
    for m in (ref, model):
        cache = transformers.DynamicCache(config=m.config)
        with torch.no_grad(), original_rotary(m) if m is ref else contextlib.nullcontext():
            m(ids[:, :7], attention_mask=mask[:, :7], use_cache=True, **{keyword: cache})
            assert cache.get_seq_length() == 7  # the prefix is in the cache: the next call reads it
            outs.append(m(ids[:, 7:], attention_mask=mask, use_cache=True, **{keyword: cache}).logits)
    _assert_close(outs[1], outs[0], "logits of the new tokens")


def test_output_attentions_falls_back_with_weights():
    """Attention weights come from the model's own eager attention for that call; outputs stay equal."""
    fusedlm.set_backend("torch")
    for family in ("llama", "bert"):
        ref, model = _models(family)
        hf.patch_model(model)
        ids, mask = _batch("right")
        real = mask.bool()
        with torch.no_grad(), original_rotary(ref):
            expected = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        _assert_close(_main(got)[real], _main(expected)[real], f"{family} output")
        assert len(got.attentions) == len(expected.attentions) == 2
        for a, e in zip(got.attentions, expected.attentions):
            _assert_close(a.transpose(1, 2)[real], e.transpose(1, 2)[real], f"{family} attention weights")


def test_mask_function_hands_over_padding_or_the_full_mask():
    """The standard causal pattern gets the 2-D padding mask (None without padding); a pattern it does not
    know (a model's or_mask_function) gets transformers' own sdpa mask, so nothing is lost."""
    from transformers import masking_utils

    hf.register()
    cfg, _ = _config("llama")
    cfg._attn_implementation = "fusedlm"
    embeds = torch.zeros(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.long)
    assert masking_utils.create_causal_mask(cfg, embeds, mask, None) is None
    mask[0, :2] = 0
    got = masking_utils.create_causal_mask(cfg, embeds, mask, None)
    assert torch.equal(got, mask.bool())

    def sink(batch_idx, head_idx, q_idx, kv_idx):  # every query also sees key 0
        return kv_idx == 0

    got = masking_utils.create_causal_mask(cfg, embeds, mask, None, or_mask_function=sink)
    cfg._attn_implementation = "sdpa"
    expected = masking_utils.create_causal_mask(cfg, embeds, mask, None, or_mask_function=sink)
    assert got.shape == (2, 1, 6, 6) and torch.equal(got, expected)


def test_patch_model_on_triton():
    """The same equality with the Triton kernels (under the interpreter on CPU): attention, RMSNorm with
    the residual add, SwiGLU and rotary of a GQA Llama."""
    triton_or_skip()
    fusedlm.set_backend("triton")
    ref, model = _models("llama")
    hf.patch_model(model)
    ids, mask = _batch("right")
    real = mask.bool()
    _assert_same_run(_run(ref, real, reference=True, input_ids=ids, attention_mask=mask),
                     _run(model, real, input_ids=ids, attention_mask=mask), real)


def test_peft_lora_model_patched_keeps_outputs_and_trains(monkeypatch):
    peft = pytest.importorskip("peft")
    from fusedlm.integrations import hf_patch

    fusedlm.set_backend("torch")
    dropouts = []
    op = hf_patch.lora_linear

    def record(*args, dropout_p=0.0, **kwargs):
        dropouts.append(dropout_p)
        return op(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(hf_patch, "lora_linear", record)
    _, base = _models("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    model = peft.get_peft_model(base, config)
    ref = copy.deepcopy(model)
    counts = hf.patch_model(model)
    assert counts["lora_linear"] == 8 and counts["attention"] == 2 and counts["swiglu"] == 2
    ids, mask = _batch("left")
    real = mask.bool()
    model.eval(), ref.eval()
    _assert_same_run(_run(ref, real, reference=True, input_ids=ids, attention_mask=mask),
                     _run(model, real, input_ids=ids, attention_mask=mask), real)
    with torch.no_grad(), model.disable_adapter(), ref.disable_adapter(), original_rotary(ref.base_model.model):
        expected = ref(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), model.disable_adapter():
        _assert_close(model(input_ids=ids, attention_mask=mask).logits[real], expected[real], "adapters disabled")

    assert dropouts and set(dropouts) == {0.0}  # eval: the fused op ran, without dropout
    model.train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    optimizer = torch.optim.AdamW(lora.values(), lr=5e-2)
    model.zero_grad(set_to_none=True)
    labels = ids.masked_fill(~real, -100)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert dropouts[-8:] == [0.1] * 8  # training: PEFT's lora_dropout, in the fused op

    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    _assert_close(merged, unmerged, "merged adapter")


def test_import_fusedlm_needs_no_transformers():
    code = "import sys, fusedlm; assert 'transformers' not in sys.modules and 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patch_model_names_what_it_leaves():
    fusedlm.set_backend("torch")
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.warns(UserWarning, match="GPT2Model"):
        counts = hf.patch_model(model)
    assert all(v == 0 for v in counts.values())
    with pytest.raises(TypeError, match="model"):
        hf.patch_model("not a model")


def test_dropout_scaling_and_full_masks_reach_the_kernels(monkeypatch):
    """transformers' dropout (training only) and scaling arrive at the fused op; a (B, 1, L, S) mask a
    caller builds (bool or additive) is applied as torch's sdpa applies it."""
    from fusedlm.integrations import hf_attention

    fusedlm.set_backend("torch")
    seen = []
    op = hf_attention.scaled_dot_product_attention

    def record(*args, **kwargs):
        seen.append((kwargs.get("dropout_p"), kwargs.get("scale")))
        return op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "scaled_dot_product_attention", record)
    hf.register()
    cfg, auto = _config("llama")
    cfg.attention_dropout = 0.25
    model = auto.from_config(cfg, attn_implementation="fusedlm")
    ids, mask = _batch("right")
    model.train()(input_ids=ids, attention_mask=mask)
    model.eval()(input_ids=ids, attention_mask=mask)
    scale = model.model.layers[0].self_attn.scaling
    assert seen == [(0.25, scale)] * 2 + [(0.0, scale)] * 2

    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    allowed = torch.rand(2, 1, 5, 7) > 0.3
    allowed[..., 0] = True
    module = model.model.layers[0].self_attn
    for mask4 in (allowed, torch.zeros(2, 1, 5, 7).masked_fill(~allowed, -1e9)):
        out, weights = hf_attention.fusedlm_attention_forward(module, q, k, v, mask4, scaling=0.3)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask4, scale=0.3,
                                                                    enable_gqa=True)
        assert weights is None
        _assert_close(out, expected.transpose(1, 2), f"{mask4.dtype} 4-D mask")


def test_deberta_attention_runs_packed_fused_and_falls_back_for_probabilities(monkeypatch):
    """Patched DeBERTa attention calls deberta_varlen_attention on the real tokens only (with the
    attention dropout in training); asking for attention probabilities runs transformers' forward."""
    fusedlm.set_backend("torch")
    calls = []
    op = fusedlm.deberta_varlen_attention

    def record(q, *args, **kwargs):
        calls.append((q.shape[0], kwargs.get("dropout_p")))
        return op(q, *args, **kwargs)

    monkeypatch.setattr(fusedlm, "deberta_varlen_attention", record)
    ref, model = _models("deberta_v3", attention_probs_dropout_prob=0.1)
    hf.patch_model(model)
    layer = model.encoder.layer[0].attention.self
    assert isinstance(layer, type(ref.encoder.layer[0].attention.self))  # still transformers' class
    ids, mask = _batch("right")
    real = mask.bool()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert calls == [(int(real.sum()), 0.0)] * 2
        model.train()(input_ids=ids, attention_mask=mask)
        assert calls[2:] == [(int(real.sum()), 0.1)] * 2
        model.eval()
        expected = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(calls) == 4  # the probabilities came from transformers' forward
    _assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], "output")
    for a, e in zip(got.attentions, expected.attentions):
        _assert_close(a.transpose(1, 2)[real], e.transpose(1, 2)[real], "attention probabilities")


def test_sliding_window_maps_to_window_size(monkeypatch):
    """Where scaled_dot_product_attention takes window_size (the API's (left, right), top-left aligned),
    Mistral's sliding_window W arrives as (W - 1, 0) with is_causal. The op is stood in for by torch's
    sdpa with the band the API defines, so the mapping is checked against transformers' own masking."""
    from fusedlm.integrations import hf_attention

    fusedlm.set_backend("torch")
    seen = []
    op = hf_attention.scaled_dot_product_attention

    def with_window(q, k, v, *, window_size=None, **kwargs):
        seen.append(window_size)
        if window_size is not None:
            left, right = window_size
            i = torch.arange(q.shape[2])[:, None]
            j = torch.arange(k.shape[2])[None, :]
            kwargs["attn_mask"] = (j >= i - left) & (j <= i + right)
        return op(q, k, v, **kwargs)

    monkeypatch.setattr(hf_attention, "_SDPA_WINDOW", True)
    monkeypatch.setattr(hf_attention, "scaled_dot_product_attention", with_window)
    ref, model = _models("mistral")
    hf.patch_model(model)
    ids, mask = _batch("right")
    real = mask.bool()
    _assert_same_run(_run(ref, real, reference=True, input_ids=ids, attention_mask=mask),
                     _run(model, real, input_ids=ids, attention_mask=mask), real)
    assert seen == [(3, 0)] * 2  # sliding_window = 4
