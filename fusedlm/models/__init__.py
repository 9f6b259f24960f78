"""Reference models on fusedlm's ops, in the gpt-fast style (a dataclass config, small modules).

Each takes ``use_kernels`` in its config: True runs the fused ops, False the same model on plain PyTorch
ops (the reference). Module and parameter names are transformers' own, so
``model.load_state_dict(hf_model.state_dict())`` works unchanged and ``Model.from_hf(hf_model)`` builds
the config and loads the weights in one call. All run on packed tokens internally (see _common.py).
"""
from .bert import BertConfig, BertModel
from .llama import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "BertConfig", "BertModel", "DebertaV2Config", "DebertaV2Model",
           "DisentangledSelfAttention"]

from .deberta_v2 import DebertaV2Config, DebertaV2Model, DisentangledSelfAttention  # noqa: E402
