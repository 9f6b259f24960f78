"""Shared by the Hugging Face integration tests: tiny random transformers models per family, the reference
run on transformers' own code, and the relative-error check.

Tolerances: float32 throughout, errors relative in norm; the fused ops reorder float32 sums (softmax,
norms), which moves results by a few 1e-7; 1e-5 leaves room for that and for nothing else.
Padded query rows are compared nowhere: transformers gives them uniform attention, fusedlm attends the
real keys or outputs zeros (both unspecified), and no real token ever reads them.
"""
import contextlib
import copy
import sys

import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

TOL = 1e-5


def assert_close(actual, expected, what):
    """Relative error ||actual - expected|| / ||expected|| (the project's measure) within TOL. The norm is
    floored at 1e-2: some gradients are zero in exact arithmetic (a key bias shifts every score of a row
    alike, which softmax ignores) and hold float32 noise of ~1e-8 in both runs."""
    err = ((actual - expected).double().norm() / expected.double().norm().clamp_min(1e-2)).item()
    assert err <= TOL, f"{what}: relative error {err:.2e} over {TOL:.0e}"


SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def config_for(family):
    c = transformers
    if family == "llama":  # GQA: 4 query heads on 2 kv heads
        return c.LlamaConfig(**SMALL, num_key_value_heads=2), AutoModelForCausalLM
    if family == "mistral":  # a window shorter than the sequences
        return c.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4), AutoModelForCausalLM
    if family == "qwen2":
        return c.Qwen2Config(**SMALL, num_key_value_heads=2), AutoModelForCausalLM
    if family == "bert":
        return c.BertConfig(**SMALL), AutoModel
    if family == "roberta":
        return c.RobertaConfig(**SMALL, pad_token_id=1), AutoModel
    if family == "deberta_v3":  # v3 style: shared keys, log buckets, normed relative embeddings
        return c.DebertaV2Config(**SMALL, relative_attention=True, position_buckets=8, max_relative_positions=32,
                                 pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                                 position_biased_input=False), AutoModel
    if family == "deberta_v2":  # v2 style: separate position projections, plain distances
        return c.DebertaV2Config(**SMALL, relative_attention=True, position_buckets=-1, max_relative_positions=16,
                                 pos_att_type=["p2c", "c2p"], share_att_key=False), AutoModel
    raise ValueError(family)


def models(family, **config):
    """(reference on transformers' eager attention, an identical copy to patch); ``config`` overrides."""
    cfg, auto = config_for(family)
    for name, value in config.items():
        setattr(cfg, name, value)
    torch.manual_seed(0)
    ref = auto.from_config(cfg, attn_implementation="eager").eval()
    return ref, copy.deepcopy(ref)


@contextlib.contextmanager
def original_rotary(model):
    """Run a reference model with transformers' own rotary function: patch_model swaps it in the family's
    modeling module, for every model of that family in the process."""
    modeling = sys.modules[type(model).__module__]
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None or not hasattr(fn, "_fusedlm_original"):
        yield
        return
    modeling.apply_rotary_pos_emb = fn._fusedlm_original
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = fn


def batch(padding_side, B=2, S=9, vocab=64):
    ids = torch.randint(2, vocab, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if padding_side == "left":
        mask[1, :3] = 0
    else:
        mask[1, 6:] = 0
    return ids, mask


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run(model, real, reference=False, **inputs):
    """Forward, a fixed random weighting of the real tokens' outputs as the loss, backward:
    (output, {parameter name: grad}). The reference runs on transformers' own rotary function."""
    model.zero_grad(set_to_none=True)
    with original_rotary(model) if reference else contextlib.nullcontext():
        out = main_output(model(**inputs))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights)[real].sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_run(ref_run, fused_run, real):
    (a, ga), (b, gb) = ref_run, fused_run
    assert_close(b[real], a[real], "output")
    assert ga.keys() == gb.keys()
    for name in ga:
        assert_close(gb[name], ga[name], f"grad of {name}")
