"""``fusedlm verify`` rows for the reference models: the model on the kernels (use_kernels=True, the
backend under test, the dtype under test) against the same weights on plain PyTorch in float64
(use_kernels=False), on a padded batch: the output (logits / last hidden state) and the gradient of the
input embeddings, which flows back through every layer's kernels.

The dtype's bound (BOUNDS, one rounding's worth, 4u) holds for these 2-layer models because each layer's
roundings are independent and the post-norm activations are O(1): measured on CPU, float32 ~2e-7 and
float16 6e-4 to 8.4e-4 against the float16 bound 2e-3. Deeper models accumulate more and are not a row here.
"""
import copy

import torch

from .bert import BertConfig, BertModel
from .deberta_v2 import DebertaV2Config, DebertaV2Model
from .llama import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)


def _models(gpu):
    """(label, model class, config kwargs, shape (B, S)); float64 masters are built from a fixed seed."""
    llama = dict(TINY, num_key_value_heads=1, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                  high_freq_factor=4.0,
                                                                  original_max_position_embeddings=16))
    deberta = dict(TINY, relative_attention=True, position_buckets=8, max_relative_positions=32,
                   pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                   position_biased_input=False, max_position_embeddings=64)
    rows = [("LlamaForCausalLM(gqa,llama3)", LlamaForCausalLM, LlamaConfig, llama, (2, 19)),
            ("BertModel", BertModel, BertConfig, dict(TINY, max_position_embeddings=64), (2, 19)),
            ("DebertaV2Model(v3)", DebertaV2Model, DebertaV2Config, deberta, (2, 19))]
    if gpu:
        rows.append(("LlamaForCausalLM(gqa,llama3)", LlamaForCausalLM, LlamaConfig,
                     dict(llama, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                          num_key_value_heads=4, vocab_size=4096), (4, 512)))
    return rows


def model_cases(gpu, Case, randn):
    out = []
    for label, model_cls, config_cls, kwargs, (B, S) in _models(gpu):
        torch.manual_seed(0)
        dropout_free = {k: 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")
                        if k in config_cls.__dataclass_fields__}
        master = model_cls(config_cls(**kwargs, **dropout_free, use_kernels=False)).double().eval()
        hidden = kwargs["hidden_size"]

        def make(g, B=B, S=S, hidden=hidden):
            lengths = torch.linspace(S, 1, B).long()  # real lengths from S down to a single token
            return dict(inputs_embeds=randn(g, B, S, hidden),
                        attention_mask=torch.arange(S)[None, :] < lengths[:, None])

        def main_output(model, inputs_embeds, attention_mask):
            out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

        def run(backend, master=master):
            import fusedlm

            def fn(inputs_embeds, attention_mask):
                model = copy.deepcopy(master).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
                model.config.use_kernels = True
                with fusedlm.use_backend(backend):
                    return main_output(model, inputs_embeds, attention_mask)
            return fn

        def ref(inputs_embeds, attention_mask, master=master):
            return main_output(master, inputs_embeds, attention_mask)

        out.append(Case(label, (B, S, hidden), make, run, ref, ("inputs_embeds",)))
    return out
