"""The language-model loss through fusedlm.linear_cross_entropy in the models: the reference LlamaForCausalLM
(use_kernels) and transformers' causal LMs after patch_model (Llama, Mistral, Qwen2, Gemma-2 with its final
logit softcap), against transformers' own loss and gradients.

Expected values come from the unpatched transformers model (eager attention, its rotary function) or the
reference model's plain path. Tolerances: float32, errors relative in norm within 1e-5 (hf_helpers.TOL): both
sides compute in float32 and differ by summation order (~1e-7). The vocabulary is 251, a size no other dim of
these models has, so that a (tokens, vocab) tensor is recognisable by its shape.
"""
import contextlib
import copy
import warnings

import pytest
import torch

import fusedlm
from fusedlm.models import LlamaForCausalLM

transformers = pytest.importorskip("transformers")

from fusedlm.integrations import hf, hf_compat  # noqa: E402
from fusedlm.ops import cross_entropy as ce_op  # noqa: E402
from hf_helpers import TOL, original_rotary  # noqa: E402

V = 251
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
HAS_GEMMA2 = hasattr(transformers, "Gemma2Config")
FAMILIES = ["llama", "mistral", "qwen2"] + (["gemma2"] if HAS_GEMMA2 else [])


def _config(family):
    if family == "llama":
        return transformers.LlamaConfig(**SMALL)
    if family == "mistral":
        return transformers.MistralConfig(**SMALL, sliding_window=4)
    if family == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(**SMALL)
    if family == "gemma2":  # a softcap the logits reach (they are scaled up below)
        return transformers.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=3.0, sliding_window=4)
    raise ValueError(family)


def _models(family, **overrides):
    """(unpatched transformers model, an identical copy patched), in training mode (no dropout configured).
    The LM head is scaled so that the logits spread over a few units (softmax far from uniform)."""
    cfg = _config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        ref.lm_head.weight.mul_(30.0)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Gemma-2: only its loss is fused (named in a warning)
        counts = hf.patch_model(model)
    assert counts["linear_cross_entropy"] == 1
    return ref.train(), model.train()


def _batch(B=2, S=9, pad=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[1, S - 3:] = 0  # right padding; its labels -100
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _rel(a, b, floor):
    return ((a - b).double().norm() / max(b.double().norm().item(), floor)).item()


def _loss_and_grads(model, reference=False, **inputs):
    model.zero_grad(set_to_none=True)
    with original_rotary(model) if reference else contextlib.nullcontext():
        out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref_run, run):
    (a, ga), (b, gb) = ref_run, run
    err = _rel(b.loss, a.loss, 0.0)
    assert err <= TOL, f"loss {b.loss.item()} vs {a.loss.item()}: {err:.2e}"
    assert ga.keys() == gb.keys()
    top = max(g.norm().item() for g in ga.values())
    for name in ga:  # relative to the grad itself; grads exactly 0 in exact arithmetic (a key bias) to the largest
        err = _rel(gb[name], ga[name], 1e-4 * top)
        assert err <= TOL, f"grad of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_loss_and_grads_equal_transformers(family, backend):
    """Padding (-100 labels), then num_items_in_batch (sum / n, gradient accumulation): the loss and every
    parameter's gradient as transformers computes them; logits None in training."""
    if backend == "triton" and family not in ("llama", "gemma2"):
        pytest.skip("the interpreter is slow: Triton on the plain and the softcapped head only")
    fusedlm.set_backend(backend)
    ref, model = _models(family, num_hidden_layers=1 if backend == "triton" else 2)  # the interpreter is slow
    ids, mask, labels = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ours = _loss_and_grads(model, **inputs)
    assert ours[0].logits is None
    _assert_same(_loss_and_grads(ref, reference=True, **inputs), ours)
    n = torch.tensor(23)  # as the Trainer passes it: the tokens of all accumulated micro-batches
    _assert_same(_loss_and_grads(ref, reference=True, num_items_in_batch=n, **inputs),
                 _loss_and_grads(model, num_items_in_batch=n, **inputs))


def test_shift_labels_ignore_index_and_tuple_output():
    fusedlm.set_backend("torch")
    ref, model = _models("llama")
    ids, mask, labels = _batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].clone()
    shifted[0, :3] = -100
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    _assert_same(_loss_and_grads(ref, reference=True, **inputs), _loss_and_grads(model, **inputs))
    other = labels.masked_fill(labels == -100, -1)  # another ignore_index, passed on to the loss
    inputs = dict(input_ids=ids, attention_mask=mask, labels=other, ignore_index=-1)
    _assert_same(_loss_and_grads(ref, reference=True, **inputs), _loss_and_grads(model, **inputs))
    with torch.no_grad(), original_rotary(ref):
        want = ref(input_ids=ids, labels=labels, return_dict=False)
    got = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) - 1  # the logits (None) left out, as transformers does
    assert _rel(got[0], want[0], 0.0) <= TOL


def test_logits_to_keep_keeps_its_meaning():
    """The loss over the kept positions only, labels given for those, as transformers; labels of another
    length are refused as transformers refuses them."""
    fusedlm.set_backend("torch")
    ref, model = _models("qwen2")
    ids, _, labels = _batch(S=10, pad=False)
    for keep in (4, torch.tensor([0, 2, 3, 7, 8])):
        n = keep if isinstance(keep, int) else len(keep)
        kept = labels[:, -n:] if isinstance(keep, int) else labels[:, keep]
        inputs = dict(input_ids=ids, labels=kept, logits_to_keep=keep)
        _assert_same(_loss_and_grads(ref, reference=True, **inputs), _loss_and_grads(model, **inputs))
    with pytest.raises((ValueError, RuntimeError)), original_rotary(ref):
        ref(input_ids=ids, labels=labels, logits_to_keep=4)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=labels, logits_to_keep=4)


class _RecordShapes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("family", ["llama", "gemma2"] if HAS_GEMMA2 else ["llama"])
def test_patched_training_step_never_makes_the_logits(family, backend, monkeypatch):
    """No tensor of (tokens, vocab) elements in the forward and backward (the op's chunk buffers kept small
    here, as they are relative to real sizes): the unpatched model makes them (the check sees them)."""
    if backend == "triton" and family != "gemma2":
        pytest.skip("the interpreter is slow: Triton on Gemma-2 (whose loss alone is patched) only")
    fusedlm.set_backend(backend)
    monkeypatch.setattr(ce_op, "CHUNK_BYTES", 1)  # 16-token chunks
    ref, model = _models(family)
    ids, mask, labels = _batch(B=2, S=40)  # 80 tokens: N * V over the embedding's and the head's V * D
    N = ids.numel()

    def big(shapes):
        return [s for s in shapes if V in s and torch.Size(s).numel() >= N * V]

    for m, expect in ((model, False), (ref, True)):
        with _RecordShapes() as rec:
            m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert bool(big(rec.shapes)) == expect, big(rec.shapes)


def test_eval_generate_and_return_logits():
    """Evaluation (labels or not) and generate run transformers' forward: its logits and loss. return_logits
    asks for the logits in training (True) or for none in evaluation (False)."""
    fusedlm.set_backend("torch")
    ref, model = _models("llama")
    ids, mask, labels = _batch()
    ref.eval(), model.eval()
    real = mask.bool()
    with torch.no_grad(), original_rotary(ref):
        want = ref(input_ids=ids, attention_mask=mask, labels=labels)
        want_gen = ref.generate(ids[:1], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), want_gen)
        assert model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False).logits is None
    assert _rel(got.logits[real], want.logits[real], 0.0) <= TOL and _rel(got.loss, want.loss, 0.0) <= TOL
    model.train()
    got = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    assert got.logits is not None and _rel(got.logits[real], want.logits[real], 0.0) <= TOL


def test_what_the_fused_loss_leaves_to_transformers():
    """A loss function set by the user and a hooked LM head run transformers' forward (logits returned);
    the patch survives deepcopy and a second patch_model; an unknown forward is left with one warning."""
    fusedlm.set_backend("torch")
    ref, model = _models("llama")
    ids, _, labels = _batch()
    seen = []
    model.loss_function = lambda logits, labels, vocab_size, **kw: seen.append(logits.shape) or logits.sum() * 0
    assert model(input_ids=ids, labels=labels).logits is not None and seen == [(2, 9, V)]
    del model._loss_function
    handle = model.lm_head.register_forward_hook(lambda *a: seen.append("hook"))
    assert model(input_ids=ids, labels=labels).logits is not None and seen[-1] == "hook"
    handle.remove()
    assert model(input_ids=ids, labels=labels).logits is None
    twin = copy.deepcopy(model)
    assert twin.forward.model is twin and twin(input_ids=ids, labels=labels).logits is None
    assert hf.patch_model(model)["linear_cross_entropy"] == 0

    plain = copy.deepcopy(ref)  # unpatched
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(hf_compat.KNOWN_FORWARDS, "causal_lm", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts = hf.patch_model(plain)
    mine = [w for w in caught if "patch_model left" in str(w.message)]
    assert counts["linear_cross_entropy"] == 0 and len(mine) == 1 and "LlamaForCausalLM loss" in str(mine[0].message)
    assert "forward" not in plain.__dict__ and plain(input_ids=ids, labels=labels).logits is not None


# ------------------------------------------------------------------------------------------------
# The reference model
# ------------------------------------------------------------------------------------------------

def test_reference_llama_loss_through_linear_cross_entropy(backend):
    """use_kernels: the loss from linear_cross_entropy equals the plain path's and transformers' (left
    padding, the first real token predicted by nothing), gradients too; logits None with labels unless
    return_logits=True; without labels, logits as before."""
    fusedlm.set_backend(backend)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1}, tie_word_embeddings=True)
    hf_model = transformers.LlamaForCausalLM(config).train()
    fast = LlamaForCausalLM.from_hf(hf_model, use_kernels=True)
    slow = LlamaForCausalLM.from_hf(hf_model, use_kernels=False)
    ids, mask, _ = _batch(B=3, S=8, pad=False)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # transformers would count the last pad predicting it; ours predicts nothing there
    runs = [_loss_and_grads(m, reference=m is hf_model, input_ids=ids, attention_mask=mask, labels=labels)
            for m in (fast, slow, hf_model)]
    assert runs[0][0].logits is None and runs[1][0].logits is None
    for other in runs[1:]:
        (a, ga), (b, gb) = other, runs[0]
        assert _rel(b.loss, a.loss, 0.0) <= TOL
        for name in gb:
            assert _rel(gb[name], ga[name], 1e-6) <= TOL, name
    with torch.no_grad():
        both = fast(ids, attention_mask=mask, labels=labels, return_logits=True)
        plain = slow(ids, attention_mask=mask)
    real = mask.bool()
    assert _rel(both.logits[real], plain.logits[real], 0.0) <= TOL and _rel(both.loss, runs[1][0].loss, 0.0) <= TOL
    assert plain.loss is None and fast(ids, attention_mask=mask, return_logits=False).logits is None
