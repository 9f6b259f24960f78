"""Integrations of fusedlm's ops into other libraries.

``fusedlm.integrations.hf``: Hugging Face transformers (and PEFT): ``register()`` adds "fusedlm" to
transformers' attention registry, ``patch_model(model)`` swaps a loaded model's modules for fused ones.
transformers and peft are optional dependencies: they are imported by that submodule only, never by
``import fusedlm``.
"""
