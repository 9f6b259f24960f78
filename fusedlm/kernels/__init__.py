"""Triton kernels, one module per op family (attention and DeBERTa: the forward module, a *_backward one
that imports from it, and attention_configs for attention's block shapes); installed as fusedlm.kernels.

Each module holds the @triton.jit kernels first, then host launchers that take 2-D or 4-D tensors,
allocate outputs and launch through a ``launch`` callable (fusedlm._triton.launch), so the same
launcher runs eagerly, under the interpreter and inside torch.library.triton_op tracing.
"""
