"""fusedlm.models against transformers' own models (tiny random configs, float32 on CPU).

Each reference model is built with ``from_hf`` from a random transformers model and must give the same
outputs (on the real tokens) and the same parameter gradients, with ``use_kernels`` True and False, on
padded and packed batches. Bound: BOUNDS[float32] = 1e-5 relative; both sides compute in float32, so
they differ by summation order only (~1e-7 seen); a wrong index, mask or missing term gives 1e-2 and more.
Most tests run the torch backend; a few run the Triton kernels under the interpreter.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedlm
from fusedlm.models import (BertConfig, BertModel, DebertaV2Config, DebertaV2Model, DisentangledSelfAttention,
                            LlamaConfig, LlamaForCausalLM)
from fusedlm.verify import BOUNDS, rel_err

from helpers import RecordFusedOps, triton_or_skip

tf = pytest.importorskip("transformers")
BOUND = BOUNDS[torch.float32]
VOCAB = 97


def _close(got, want, what):
    err = rel_err(got, want)
    assert err <= BOUND, f"{what}: relative error {err:.2e} over {BOUND:.0e}"


def _padded_batch(gen, left=False):
    """ids (3, 11) with real lengths 11, 7, 4 (right padding, or left with ``left``)."""
    ids = torch.randint(0, VOCAB, (3, 11), generator=gen)
    lengths = torch.tensor([11, 7, 4])
    pos = torch.arange(11)
    mask = (pos[None] >= 11 - lengths[:, None]) if left else (pos[None] < lengths[:, None])
    return ids, mask.long()


def _compare_grads(ours, hf):
    """Every parameter gradient within BOUND relative, with a floor of 1e-4 times the model's largest
    gradient norm: some gradients are zero in exact arithmetic (a key bias shifts every score of a row
    alike) and hold only rounding noise, which no relative test can hold."""
    theirs = dict(hf.named_parameters())
    floor = 1e-4 * max(p.grad.norm().item() for p in hf.parameters() if p.grad is not None)
    for name, p in ours.named_parameters():
        want = theirs[name].grad
        if want is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        diff = (p.grad.double() - want.double()).norm().item()
        assert diff <= BOUND * max(want.norm().item(), floor), \
            f"grad of {name}: error {diff:.2e} against norm {want.norm().item():.2e}"


# ---------------------------------------------------------------------------------------------------
# Llama

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)


def _hf_llama(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**base)).eval()


LLAMA_CONFIGS = {
    "gqa-llama3-tied": dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
    "mha-linear-bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                            rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0)),
}


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("variant,left", [("gqa-llama3-tied", False), ("mha-linear-bias", True)])
def test_llama_from_hf_padded(variant, left, use_kernels):
    gen = torch.Generator().manual_seed(1)
    hf = _hf_llama(**LLAMA_CONFIGS[variant])
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    ids, mask = _padded_batch(gen, left)
    labels = ids.masked_fill(mask == 0, -100)
    if left:  # transformers would count the last pad predicting the first real token; ours predicts nothing there
        labels[torch.arange(3), mask.argmax(1)] = -100
    out, ref = ours(ids, attention_mask=mask, labels=labels, return_logits=True), hf(ids, attention_mask=mask,
                                                                                      labels=labels)
    real = mask.bool()
    _close(out.logits[real], ref.logits[real], "logits")
    assert out.logits[~real].abs().max() == 0  # zeros at padded positions
    _close(out.loss, ref.loss, "loss")
    out.loss.backward()
    ref.loss.backward()
    _compare_grads(ours, hf)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_llama_packed_equals_separate_sequences(use_kernels):
    """cu_seqlens and restarting position_ids both give each sequence run on its own."""
    gen = torch.Generator().manual_seed(2)
    hf = _hf_llama(rope_parameters=LLAMA3_ROPE)
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    lengths = [4, 1, 6]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen)
    pieces = torch.split(ids, lengths, dim=1)
    ref = torch.cat([hf(p).logits for p in pieces], dim=1)
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    _close(ours(ids, cu_seqlens=cu).logits, ref, "logits (cu_seqlens)")
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    _close(ours(ids, position_ids=pos).logits, ref, "logits (restarting position_ids)")


def test_llama_gradients_kernels_equal_reference():
    gen = torch.Generator().manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rope_scaling=dict(LLAMA3_ROPE))
    fast = LlamaForCausalLM(config)
    slow = LlamaForCausalLM(LlamaConfig(**{**config.__dict__, "use_kernels": False}))
    slow.load_state_dict(fast.state_dict())
    fusedlm.set_backend("torch")
    ids, mask = _padded_batch(gen)
    for m in (fast, slow):
        m(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    _compare_grads(fast, slow)


def test_llama_greedy_generation_equals_transformers():
    gen = torch.Generator().manual_seed(4)
    hf = _hf_llama(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=True)
    fusedlm.set_backend("torch")
    ids, mask = _padded_batch(gen, left=True)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, 6, attention_mask=mask), want)


# ---------------------------------------------------------------------------------------------------
# BERT


def _hf_bert(num_hidden_layers=2):
    return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=num_hidden_layers,
                                      num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)).eval()


def _encoder_loss(hidden, mask, gen_seed=7):
    """A scalar touching every real output through fixed random weights."""
    real = hidden[mask.bool()]
    w = torch.randn(real.shape, generator=torch.Generator().manual_seed(gen_seed))
    return (real * w).sum()


@pytest.mark.parametrize("use_kernels", [False, True])
def test_bert_from_hf_padded(use_kernels):
    gen = torch.Generator().manual_seed(5)
    hf = _hf_bert()
    ours = BertModel.from_hf(hf, use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    ids, mask = _padded_batch(gen)
    types = torch.randint(0, 2, ids.shape, generator=gen)
    out, ref = ours(ids, attention_mask=mask, token_type_ids=types), hf(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    _close(out.last_hidden_state[real], ref.last_hidden_state[real], "last_hidden_state")
    _close(out.pooler_output, ref.pooler_output, "pooler_output")
    (_encoder_loss(out.last_hidden_state, mask) + out.pooler_output.sum()).backward()
    (_encoder_loss(ref.last_hidden_state, mask) + ref.pooler_output.sum()).backward()
    _compare_grads(ours, hf)


def test_bert_packed_equals_separate_sequences():
    gen = torch.Generator().manual_seed(6)
    hf = _hf_bert()
    ours = BertModel.from_hf(hf, use_kernels=True)
    fusedlm.set_backend("torch")
    ids = torch.randint(0, VOCAB, (1, 10), generator=gen)
    ref = torch.cat([hf(p).last_hidden_state for p in torch.split(ids, [3, 7], dim=1)], dim=1)
    out = ours(ids, cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32)).last_hidden_state
    _close(out, ref, "last_hidden_state")


# ---------------------------------------------------------------------------------------------------
# DeBERTa-v2 / v3

DEBERTA_CONFIGS = {
    # v3-base's shape of config: buckets, shared keys, both terms, normalised relative embeddings
    "v3": dict(relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type="p2c|c2p",
               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False),
    # v2-style: absolute positions in the input, separate position projections, no buckets, c2p only
    "v2-c2p": dict(relative_attention=True, max_relative_positions=6, pos_att_type=["c2p"], share_att_key=False,
                   type_vocab_size=2),
    "p2c-buckets": dict(relative_attention=True, position_buckets=8, max_relative_positions=16,
                        pos_att_type=["p2c"], share_att_key=False),
}


def _hf_deberta(variant, num_hidden_layers=2):
    return tf.DebertaV2Model(tf.DebertaV2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=num_hidden_layers,
                                                num_attention_heads=4, intermediate_size=96,
                                                max_position_embeddings=64, **DEBERTA_CONFIGS[variant])).eval()


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("variant", list(DEBERTA_CONFIGS))
def test_deberta_from_hf_padded(variant, use_kernels):
    gen = torch.Generator().manual_seed(8)
    hf = _hf_deberta(variant)
    ours = DebertaV2Model.from_hf(hf, use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    ids, mask = _padded_batch(gen)
    types = torch.randint(0, 2, ids.shape, generator=gen) if hf.config.type_vocab_size else None
    out = ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    ref = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    _close(out[real], ref[real], "last_hidden_state")
    _encoder_loss(out, mask).backward()
    _encoder_loss(ref, mask).backward()
    _compare_grads(ours, hf)


def test_deberta_packed_equals_separate_sequences():
    gen = torch.Generator().manual_seed(9)
    hf = _hf_deberta("v3")
    ours = DebertaV2Model.from_hf(hf, use_kernels=True)
    fusedlm.set_backend("torch")
    ids = torch.randint(0, VOCAB, (1, 13), generator=gen)
    ref = torch.cat([hf(p).last_hidden_state for p in torch.split(ids, [9, 4], dim=1)], dim=1)
    out = ours(ids, cu_seqlens=torch.tensor([0, 9, 13], dtype=torch.int32)).last_hidden_state
    _close(out, ref, "last_hidden_state")


@pytest.mark.parametrize("variant", ["v3", "v2-c2p"])
def test_deberta_attention_module_replaces_transformers(variant):
    """DisentangledSelfAttention.from_hf in place of transformers' module, called the way transformers
    calls it, keeps the model's outputs and its parameters (shared, not copied)."""
    gen = torch.Generator().manual_seed(10)
    hf = _hf_deberta(variant)
    ids, mask = _padded_batch(gen)
    ref = hf(ids, attention_mask=mask).last_hidden_state
    fusedlm.set_backend("torch")
    for layer in hf.encoder.layer:
        original = layer.attention.self
        layer.attention.self = DisentangledSelfAttention.from_hf(original, hf.config)
        ours = layer.attention.self
        assert ours.query_proj is original.query_proj and ours.state_dict().keys() == original.state_dict().keys()
        assert not any(t.is_meta for t in ours.state_dict().values())
    out = hf(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    _close(out[real], ref[real], "last_hidden_state")


@pytest.mark.parametrize("model", ["bert", "deberta"])
def test_attention_dropout_in_training(model):
    """Attention-probability dropout on the kernels in train mode: the same seed gives the same output,
    another seed another one, gradients flow; eval mode drops nothing (equals the reference)."""
    cls, cfg = (BertModel, BertConfig) if model == "bert" else (DebertaV2Model, DebertaV2Config)
    extra = {} if model == "bert" else dict(relative_attention=True, position_buckets=8, max_relative_positions=16,
                                            pos_att_type=["c2p", "p2c"], share_att_key=True)
    config = cfg(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5, **extra)
    fast = cls(config)
    ids, mask = _padded_batch(torch.Generator().manual_seed(12))
    fusedlm.set_backend("torch")
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(fast(ids, attention_mask=mask).last_hidden_state)
    real = mask.bool()
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0][real], runs[2][real])
    _encoder_loss(runs[0], mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    slow = cls(cfg(**{**config.__dict__, "use_kernels": False}))
    slow.load_state_dict(fast.state_dict())
    fast.eval(), slow.eval()
    hidden = [m(ids, attention_mask=mask).last_hidden_state[real] for m in (fast, slow)]
    _close(hidden[0], hidden[1], "eval output")
    assert not torch.allclose(runs[0][real], fast(ids, attention_mask=mask).last_hidden_state[real])


# ---------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU): one padded batch per model


FUSED_OPS = {"llama": ("attention", "norm", "rope", "swiglu"), "bert": ("attention", "norm"),
             "deberta": ("deberta", "norm")}


@pytest.mark.parametrize("model", ["llama", "bert", "deberta"])
def test_models_on_triton_backend(model):
    """use_kernels=True runs the fused Triton ops (recorded at the dispatcher) and still equals transformers."""
    triton_or_skip()
    gen = torch.Generator().manual_seed(11)
    ids, mask = _padded_batch(gen)
    real = mask.bool()
    if model == "llama":
        hf = _hf_llama(rope_parameters=LLAMA3_ROPE, num_hidden_layers=1)
        ours = LlamaForCausalLM.from_hf(hf)
        get = lambda m: m(ids, attention_mask=mask).logits  # noqa: E731
    else:
        hf = _hf_bert(num_hidden_layers=1) if model == "bert" else _hf_deberta("v3", num_hidden_layers=1)
        ours = (BertModel if model == "bert" else DebertaV2Model).from_hf(hf)
        get = lambda m: m(ids, attention_mask=mask).last_hidden_state  # noqa: E731
    with fusedlm.use_backend("triton"), RecordFusedOps("") as recorded:
        out = get(ours)
        _encoder_loss(out, mask).backward()
    ref = get(hf)
    _encoder_loss(ref, mask).backward()
    _close(out[real], ref[real], "output")
    _compare_grads(ours, hf)
    names = {func.name() for func, _, _ in recorded.calls}
    for part in FUSED_OPS[model]:
        assert any(part in n for n in names), f"no fusedlm op named *{part}* ran: {sorted(names)}"


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, use_kernels=False))
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="pos_att_type"):
        DebertaV2Config(pos_att_type=["c2c"])
    with pytest.raises(ValueError, match="conv_kernel_size"):
        DebertaV2Config(conv_kernel_size=3)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="mish")


# ---------------------------------------------------------------------------------------------------
# The training example: a few steps in process, and 2 processes under torchrun (DDP, gloo)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_tiny.py"
TINY = ["--steps", "3", "--seqlen", "16", "--batch", "2", "--hidden", "32", "--vocab", "40", "--backend", "torch"]


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_example_curves_agree():
    results = _load_example().main(TINY)
    for kind, res in results["models"].items():
        assert res["max_rel_diff"] <= BOUND, (kind, res["kernels"], res["reference"])
        assert res["kernels"][-1] < res["kernels"][0], (kind, res["kernels"])  # it learns


def test_train_example_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
           *TINY, "--steps", "2", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["world_size"] == 2
    for kind, res in results["models"].items():
        assert res["ranks_in_sync"], kind  # DDP averaged the gradients: the replicas stayed identical
        assert res["max_rel_diff"] <= BOUND, (kind, res["kernels"], res["reference"])
