"""A patched transformers model behaves like the unpatched one, on every transformers from 5.17 to the newest:
what transformers itself does with a model (set attributes of its norms, print it, hook it, switch its attention,
ask for attention weights by keyword or by config, compile it, generate with a dynamic or a static cache, feed
DeBERTa masks with holes and configs with extra position-term entries) gives what it gives unpatched.

Expected values come from the unpatched model run by transformers' own code (eager attention, its rotary
function), never from fusedlm. Tolerances as in hf_helpers (float32, 1e-5 relative).
"""
import copy
import warnings

import pytest
import torch

import fusedlm

transformers = pytest.importorskip("transformers")

from fusedlm.integrations import hf, hf_compat  # noqa: E402
from hf_helpers import assert_close, batch, main_output, models, original_rotary  # noqa: E402


def _forward(model, reference=False, **inputs):
    with torch.no_grad(), original_rotary(model) if reference else _nothing():
        return model(**inputs)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _same_outputs(ref, model, **inputs):
    real = inputs["attention_mask"].bool()
    expected = main_output(_forward(ref, reference=True, **inputs))
    got = main_output(_forward(model, **inputs))
    assert_close(got[real], expected[real], "output")


# ------------------------------------------------------------------------------------------------
# The swapped modules keep their attributes, repr, keys and hooks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "bert"])
def test_norm_epsilon_is_settable_and_used(family):
    """transformers sets ``eps`` (or ``variance_epsilon``) on norms; a patched norm takes it and uses it."""
    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    for m in (ref, model):
        for module in m.modules():
            for name in ("eps", "variance_epsilon"):
                if name in vars(module) or isinstance(getattr(type(module), name, None), property):
                    setattr(module, name, 0.25)  # large enough to move every output visibly
    for (name, a), b in zip(ref.named_modules(), model.modules()):
        for attr in ("eps", "variance_epsilon"):
            if hasattr(a, attr):
                assert getattr(b, attr) == getattr(a, attr) == 0.25, f"{name}.{attr}"
    ids, mask = batch("right")
    _same_outputs(ref, model, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["llama", "bert", "deberta_v3"])
def test_repr_keys_and_hooks_stay(family):
    fusedlm.set_backend("torch")
    ref, model = models(family)
    fired = []
    norm_name = next(n for n, m in model.named_modules() if "norm" in type(m).__name__.lower())
    model.get_submodule(norm_name).register_forward_hook(lambda *a: fired.append("before"))
    hf.patch_model(model)
    model.get_submodule(norm_name).register_forward_hook(lambda *a: fired.append("after"))
    assert list(model.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(ref.named_modules(), model.modules()):
        assert a.extra_repr() == b.extra_repr(), name
        assert isinstance(b, type(a)), name  # isinstance checks against transformers' classes hold
    ids, mask = batch("left")
    _forward(model, input_ids=ids, attention_mask=mask)
    assert fired == ["before", "after"]


@pytest.mark.parametrize("family,norm", [("llama", "model.layers.0.post_attention_layernorm"),
                                         ("bert", "encoder.layer.0.output.LayerNorm"),
                                         ("bert", "encoder.layer.0.attention.output.LayerNorm")])
def test_hooks_on_residual_norms_see_what_they_see_unpatched(family, norm):
    """A norm whose residual add the patch fuses: a hook on it gets the one input tensor transformers passes
    (h + residual) and the one output tensor, equal to the unpatched model's; a hook that replaces the output
    is obeyed; removing the hook brings the fused path back (same outputs)."""
    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = ([a.detach().clone() for a in args], output)
        return hook

    handles = [ref.get_submodule(norm).register_forward_hook(record("ref")),
               model.get_submodule(norm).register_forward_hook(record("fused"))]
    ids, mask = batch("right")
    _same_outputs(ref, model, input_ids=ids, attention_mask=mask)
    (ref_args, ref_out), (args, out) = seen["ref"], seen["fused"]
    assert len(args) == len(ref_args) == 1 and isinstance(out, torch.Tensor)
    assert_close(args[0], ref_args[0], "the norm's input")
    assert_close(out.detach(), ref_out.detach(), "the norm's output")
    for h in handles:
        h.remove()
    for m in (ref, model):  # a hook returning a tensor replaces the output, patched or not
        m.get_submodule(norm).register_forward_hook(lambda module, args, output: output * 0.5)
    _same_outputs(ref, model, input_ids=ids, attention_mask=mask)


def test_deberta_attention_keeps_hooks_and_attributes():
    """The DeBERTa attention the patch replaces: hooks registered on it before the patch still fire after it
    (and their handles remove them), attributes set on it stay."""
    fusedlm.set_backend("torch")
    ref, model = models("deberta_v3")
    name = "encoder.layer.0.attention.self"
    fired = []
    handle = model.get_submodule(name).register_forward_hook(lambda *a: fired.append("hook"))
    model.get_submodule(name).user_note = "mine"
    initialized = getattr(model.get_submodule(name), "_is_hf_initialized", None)
    hf.patch_model(model)
    attention = model.get_submodule(name)
    assert type(attention) is not type(ref.get_submodule(name))  # replaced by the fused module
    assert attention.user_note == "mine"
    assert getattr(attention, "_is_hf_initialized", None) == initialized
    ids, mask = batch("right")
    _forward(model, input_ids=ids, attention_mask=mask)
    assert fired == ["hook"]
    handle.remove()
    _forward(model, input_ids=ids, attention_mask=mask)
    assert fired == ["hook"]


# ------------------------------------------------------------------------------------------------
# Attention implementation switches and attention weights
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "bert"])
def test_set_attn_implementation_back_and_forth(family):
    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    ids, mask = batch("left")
    for impl in ("eager", "sdpa", "fusedlm", "eager", "fusedlm"):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        _same_outputs(ref, model, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("how", ["keyword", "config"])
def test_attention_weights_by_keyword_and_by_config(family, how):
    """Weights equal to transformers' eager ones whenever they are asked for: by keyword, or by
    ``config.output_attentions`` (set while the implementation is "eager", as transformers requires)."""
    fusedlm.set_backend("torch")
    overrides = {"output_attentions": True} if how == "config" else {}
    ref, model = models(family, **overrides)
    hf.patch_model(model)
    assert model.config._attn_implementation == "fusedlm"
    ids, mask = batch("right")
    kw = {"output_attentions": True} if how == "keyword" else {}
    expected = _forward(ref, reference=True, input_ids=ids, attention_mask=mask, **kw)
    got = _forward(model, input_ids=ids, attention_mask=mask, **kw)
    real = mask.bool()
    assert len(expected.attentions) == 2 and len(got.attentions) == 2
    for a, e in zip(got.attentions, expected.attentions):
        assert_close(a.transpose(1, 2)[real], e.transpose(1, 2)[real], "attention weights")
    assert_close(main_output(got)[real], main_output(expected)[real], "output")


# ------------------------------------------------------------------------------------------------
# Generation: the cache is used, greedy tokens equal; static caches compile once
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_uses_the_cache_and_equals_unpatched(family, cache_implementation):
    """Greedy tokens equal transformers' with the KV cache in use: after generate the cache holds every
    token but the last (transformers 5.17 passes it as past_key_values, a patched layer must too)."""
    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    ids, mask = batch("left", S=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    with original_rotary(ref):
        expected = ref.generate(ids, **kw)
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    assert int(got.past_key_values.get_seq_length()) == ids.shape[1] + 6 - 1


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_decodes_through_the_split_kv_kernel(cache_implementation):
    """On the Triton backend a patched model's decode steps (one query over the whole cache, DynamicCache or
    StaticCache) run the split-KV kernel, and the greedy tokens equal transformers'."""
    from helpers import RecordFusedOps, triton_or_skip

    triton_or_skip()
    fusedlm.set_backend("triton")
    ref, model = models("llama")
    hf.patch_model(model)
    ids, mask = batch("left", S=6)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    with original_rotary(ref):
        expected = ref.generate(ids, **kw)
    with RecordFusedOps("kv_cache_attention_fwd") as rec:
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)
    layers = model.config.num_hidden_layers
    assert len(rec.calls) >= 3 * layers, f"{len(rec.calls)} split-KV calls for 3 decode steps x {layers} layers"


def _decode_steps(model, ids, mask, steps, step_fn):
    """Greedy decoding on a StaticCache: the prompt through ``model``, then ``steps`` tokens through
    ``step_fn`` (the model's forward, compiled or not). Returns the new tokens (B, steps + 1)."""
    keyword = hf_compat.cache_keyword(model.forward)
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, **{keyword: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = step_fn(token, attention_mask=mask, use_cache=True, cache_position=torch.tensor([mask.shape[1] - 1]),
                          position_ids=mask.cumsum(-1)[:, -1:] - 1, **{keyword: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_decode_compiles_fullgraph_without_recompiling_per_step(family):
    """The decode step of a patched model compiles with fullgraph=True and gives the eager tokens; over 6
    steps torch.compile builds no more graphs than for transformers' own sdpa model (the growing 2-D mask
    makes the second step dynamic, once), i.e. no guard on values recompiles it every step."""
    from torch._dynamo.utils import counters

    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    ids, mask = batch("left", S=6)
    expected = _decode_steps(ref, ids, mask, 6, ref.forward)
    graphs = {}
    for name, m in (("fusedlm", model), ("sdpa", copy.deepcopy(ref))):
        if name == "sdpa":
            m.set_attn_implementation("sdpa")
        torch._dynamo.reset()
        counters.clear()
        tokens = _decode_steps(m, ids, mask, 6, torch.compile(m.forward, fullgraph=True))
        assert torch.equal(tokens, expected), name
        graphs[name] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs["fusedlm"] <= max(graphs["sdpa"], 2), graphs


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "bert", "deberta_v3"])
def test_compile_fullgraph_with_padding_masks(family):
    """torch.compile(fullgraph=True) of a patched model on a left-padded batch (and Mistral's sliding window;
    DeBERTa on its dense op, as packing needs the token count on the host) equals transformers' eager model
    on the real tokens."""
    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    ids, mask = batch("left")
    real = mask.bool()
    expected = main_output(_forward(ref, reference=True, input_ids=ids, attention_mask=mask))
    torch._dynamo.reset()
    with torch.no_grad():
        got = main_output(torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask))
    torch._dynamo.reset()
    assert_close(got[real], expected[real], "compiled output")


# ------------------------------------------------------------------------------------------------
# DeBERTa: configs transformers accepts, masks with holes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos_att_type", [["none"], ["c2p", "p2p"], "p2c|c2p", ["p2c", "c2p", "c2p"]])
def test_deberta_position_terms_as_transformers_reads_them(pos_att_type):
    """Entries other than c2p / p2c are ignored, as transformers ignores them (no error)."""
    fusedlm.set_backend("torch")
    ref, model = models("deberta_v3", pos_att_type=pos_att_type)
    assert hf.patch_model(model)["deberta_attention"] == 2
    ids, mask = batch("right")
    _same_outputs(ref, model, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["deberta_v3", "deberta_v2"])
def test_deberta_mask_with_holes_counts_positions_over_the_gaps(family):
    """A padding mask with zeros between real tokens: transformers' relative positions are indices in the
    padded row, so the fused attention must not pack the gaps away. Outputs and gradients of real tokens."""
    fusedlm.set_backend("torch")
    ref, model = models(family)
    hf.patch_model(model)
    ids = torch.randint(2, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 4] = 0            # a hole
    mask[1, [0, 3, 4, 8]] = 0  # left padding, a two-token hole and right padding
    real = mask.bool()
    weights = torch.randn(2, 9, 64)
    grads = []
    for m, reference in ((ref, True), (model, False)):
        m.zero_grad(set_to_none=True)
        out = main_output(m(input_ids=ids, attention_mask=mask))
        (out * weights)[real].sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = grads
    assert_close(b[real], a[real], "output")
    for name in ga:
        assert_close(gb[name], ga[name], f"grad of {name}")


def test_reference_deberta_model_refuses_holes():
    from fusedlm.models import DebertaV2Model

    fusedlm.set_backend("torch")
    ref, _ = models("deberta_v3")
    ours = DebertaV2Model.from_hf(ref)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.randint(2, 64, (1, 5)), attention_mask=mask)


# ------------------------------------------------------------------------------------------------
# A transformers whose code fusedlm does not know: left as it is, with one warning
# ------------------------------------------------------------------------------------------------

def test_unknown_forwards_are_left_with_one_warning(monkeypatch):
    """What patch_model does on a transformers release whose modules changed: a forward whose code is not a
    known form (simulated by forgetting the known forms) and a rotary function that computes something else
    stay transformers' own, named in one warning, and the model still gives transformers' outputs."""
    import sys

    fusedlm.set_backend("torch")
    ref, model = models("llama")
    modeling = sys.modules[type(model).__module__]
    monkeypatch.setitem(hf_compat.KNOWN_FORWARDS, "mlp", set())
    monkeypatch.setitem(hf_compat.KNOWN_FORWARDS, "decoder_layer", set())
    original = modeling.apply_rotary_pos_emb
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", getattr(original, "_fusedlm_original", original))

    def interleaved_rotary(q, k, cos, sin, unsqueeze_dim=1):  # another model family's rotary: not Llama's
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", interleaved_rotary)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = hf.patch_model(model)
    mine = [w for w in caught if "patch_model left" in str(w.message)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "LlamaMLP" in text and "LlamaDecoderLayer" in text and "apply_rotary_pos_emb" in text
    assert counts["swiglu"] == counts["residual_norm"] == counts["rotary"] == 0
    assert counts["rms_norm"] == 5 and counts["attention"] == 2  # the rest is patched
    assert modeling.apply_rotary_pos_emb is interleaved_rotary
    ids, mask = batch("left")
    expected = main_output(_forward(ref, input_ids=ids, attention_mask=mask))  # the same rotary for both
    got = main_output(_forward(model, input_ids=ids, attention_mask=mask))
    assert_close(got[mask.bool()], expected[mask.bool()], "output")


def test_code_digest_reads_only_what_the_code_computes(tmp_path):
    """Docstrings, comments, annotations, decorators and the past_key_values -> cache rename do not change
    the digest; a changed expression does."""
    import importlib.util

    (tmp_path / "digest_forms.py").write_text(
        "import functools\n"
        "def f(self, x, past_key_values=None):\n    'doc'\n    y = x + 1  # c\n    return y, past_key_values\n"
        "@functools.lru_cache\n"
        "def g(self, x: int, cache: object = None) -> tuple:\n    y: int = x + 1\n    return y, cache\n"
        "def h(self, x, cache=None):\n    y = x + 2\n    return y, cache\n")
    spec = importlib.util.spec_from_file_location("digest_forms", tmp_path / "digest_forms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = hf_compat._digest
    assert d(module.f) is not None
    assert d(module.f) == d(module.g) != d(module.h)


def test_rotary_probe_tells_llama_rotary_from_others():
    import sys

    ref, _ = models("llama")
    modeling = sys.modules[type(ref).__module__]
    fn = modeling.apply_rotary_pos_emb
    assert hf_compat.rotary_matches(getattr(fn, "_fusedlm_original", fn))
    assert not hf_compat.rotary_matches(lambda q, k, cos, sin: (q, k))
    assert not hf_compat.rotary_matches(lambda q, k: (q, k))  # another signature


@pytest.mark.parametrize("family", ["llama", "deberta_v3"])
def test_patched_model_pickles_and_loads_in_a_fresh_process(family, tmp_path):
    """torch.save(model) of a patched model, loaded by a process that never patched anything, gives the same
    outputs (the Fused classes rebuild themselves from their importable parts)."""
    import subprocess
    import sys

    fusedlm.set_backend("torch")
    _, model = models(family)
    hf.patch_model(model)
    ids, mask = batch("right")
    expected = main_output(_forward(model, input_ids=ids, attention_mask=mask))
    torch.save({"model": model, "ids": ids, "mask": mask, "expected": expected}, tmp_path / "patched.pt")
    code = ("import torch, fusedlm\nfusedlm.set_backend('torch')\n"
            f"d = torch.load({str(tmp_path / 'patched.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n"
            "    out = d['model'](input_ids=d['ids'], attention_mask=d['mask'])\n"
            "out = out.logits if hasattr(out, 'logits') else out.last_hidden_state\n"
            "real = d['mask'].bool()\n"
            "print(type(d['model']).__name__, ((out - d['expected'])[real].norm() / d['expected'][real].norm()).item())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split()[-1]) < 1e-6


def test_output_attentions_set_on_a_patched_config_is_refused_as_for_sdpa():
    """transformers refuses ``config.output_attentions = True`` for every implementation but "eager": after
    patch_model (implementation "fusedlm") that is a clear ValueError, as for "sdpa", never an empty result;
    switching to "eager" first works as it does unpatched. (The config keeps its class: transformers' Auto
    classes look models up by the config's exact class.)"""
    fusedlm.set_backend("torch")
    ref, model = models("llama")
    config_class = type(model.config)
    hf.patch_model(model)
    assert type(model.config) is config_class
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    ids, mask = batch("right")
    got = _forward(model, input_ids=ids, attention_mask=mask)
    expected = _forward(ref, reference=True, input_ids=ids, attention_mask=mask, output_attentions=True)
    for a, e in zip(got.attentions, expected.attentions):
        assert_close(a.transpose(1, 2)[mask.bool()], e.transpose(1, 2)[mask.bool()], "attention weights")


def test_patch_model_under_the_meta_device():
    """transformers builds models under torch.device("meta") (from_pretrained, init_empty_weights): patching
    there works, and the model then runs once its weights are real."""
    fusedlm.set_backend("torch")
    ref, _ = models("llama")
    cfg = copy.deepcopy(ref.config)
    hf_compat._rotary_matches_cached.cache_clear()  # as in a fresh process: the probe runs under "meta" here
    with torch.device("meta"):
        model = type(ref)(cfg)
        counts = hf.patch_model(model)
    assert counts["rms_norm"] == 5 and counts["rotary"] == 2
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    for name, buffer in ref.named_buffers():  # non-persistent ones (rotary inv_freq) are in no state dict
        model.get_buffer(name).copy_(buffer)
    ids, mask = batch("right")
    _same_outputs(ref, model.eval(), input_ids=ids, attention_mask=mask)


def test_generate_with_compiled_static_cache_never_recompiles():
    """transformers' own compiled generation (static cache, CompileConfig(fullgraph=True, dynamic=False)):
    two generations of the same shapes run without a single recompilation (dynamo raises on one) and give the
    unpatched model's tokens. The mask generate precomputes keeps one rank and shape at every step."""
    from transformers.generation import CompileConfig

    fusedlm.set_backend("torch")
    ref, model = models("llama")
    hf.patch_model(model)
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.tril(torch.ones_like(ids))  # rows with trailing zeros, as transformers' testers make them
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    kw = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0)
    torch._dynamo.reset()
    previous = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        for row in (0, 1):
            got = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                                 compile_config=compile_config, **kw)
            with original_rotary(ref):
                expected = ref.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **kw)
            assert torch.equal(got, expected)
    finally:
        torch._dynamo.config.error_on_recompile = previous
        torch._dynamo.reset()


def test_static_cache_attention_weights_span_the_cache():
    """Weights asked for during static-cache generation cover every cache slot, as transformers' eager ones."""
    fusedlm.set_backend("torch")
    ref, model = models("llama")
    hf.patch_model(model)
    ids, mask = batch("left", S=6)
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static",
              return_dict_in_generate=True, output_attentions=True)
    with original_rotary(ref):
        expected = ref.generate(ids, **kw)
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.attentions, expected.attentions):
        for a, e in zip(step_got, step_expected):
            assert a.shape == e.shape
            assert_close(a[..., -1, :], e[..., -1, :], "weights of the last query")


def test_compiled_deberta_refuses_a_mask_that_is_not_a_padding_mask():
    """Under torch.compile the fused DeBERTa attention cannot check the mask on the host: a 4-D mask that is
    not a padding mask's outer product fails an assertion on the device instead of giving wrong output."""
    fusedlm.set_backend("torch")
    _, model = models("deberta_v3")
    hf.patch_model(model)
    attention = model.encoder.layer[0].attention.self
    hidden = torch.randn(2, 6, 64)
    rel = model.encoder.get_rel_embedding()
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, 2, 4] = False  # not an outer product of any padding mask
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)
    with pytest.raises(RuntimeError, match="outer"):
        compiled(hidden, mask, rel_embeddings=rel)
    torch._dynamo.reset()


def test_deberta_batch_with_holes_equals_its_rows_alone():
    """A batch whose rows take different paths (one row with a hole: the dense op; alone, a contiguous row:
    the packed one) gives each row what it gives alone, padded positions included (transformers' own
    batching-equivalence check compares every position)."""
    fusedlm.set_backend("torch")
    _, model = models("deberta_v3")
    hf.patch_model(model)
    ids = torch.randint(2, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 4] = 0   # a hole
    mask[1, 6:] = 0  # right padding only
    batched = _forward(model, input_ids=ids, attention_mask=mask).last_hidden_state
    for row in (0, 1):
        alone = _forward(model, input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).last_hidden_state
        assert_close(batched[row], alone[0], f"row {row}, every position")
