"""The ``Fused<Name>`` classes patch_model turns transformers' modules into, made once per (mixins, original).

A fused class is ``type("Fused" + original.__name__, (*mixins, original), attrs)``: the mixins' forward,
everything else the original's (its ``extra_repr`` too, so the module prints as before). Made at run time,
such a class has no importable name, so pickling a patched model (``torch.save(model)``) or deep-copying it
goes through ``__reduce_ex__`` below: the class is rebuilt from its mixins and original class (both
importable), then the module's state is restored, in this process or a fresh one (where loading also
registers the "fusedlm" attention the model's config names).
"""
_CLASSES = {}


def fused_class(mixins, original, attrs=()):
    """The class ``Fused<original name>`` with ``mixins`` first in the MRO; ``attrs``: class attributes
    (name, value) pairs, part of the class's identity."""
    key = (tuple(mixins), original, tuple(attrs))
    if key not in _CLASSES:
        namespace = {"_fusedlm_original": original, "__module__": __name__, "_fusedlm_key": key,
                     "__reduce_ex__": _reduce_ex, **dict(attrs)}
        if hasattr(original, "extra_repr"):  # a module: printed as the original prints
            namespace["extra_repr"] = original.extra_repr
        _CLASSES[key] = type(f"Fused{original.__name__}", (*mixins, original), namespace)
    return _CLASSES[key]


def _new(mixins, original, attrs):
    from .hf_attention import register

    register()  # a patched model's config names the "fusedlm" attention: a fresh process needs it registered
    cls = fused_class(mixins, original, attrs)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    mixins, original, attrs = type(self)._fusedlm_key
    return _new, (mixins, original, attrs), self.__dict__
