"""torch.nn modules over the fused ops, with Hugging Face / PEFT parameter names.

Each module's state dict has exactly the keys of its Hugging Face (or PEFT) counterpart, so
``ours.load_state_dict(theirs.state_dict())`` works unchanged in both directions:

    RMSNorm      LlamaRMSNorm (and Gemma's with offset=1.0)  weight
    LayerNorm    torch.nn.LayerNorm                           weight, bias
    RotaryEmbedding  LlamaRotaryEmbedding                     (no keys: the cos/sin cache is not persistent)
    SwiGLUMLP    LlamaMLP                                     gate_proj.weight, up_proj.weight, down_proj.weight
                                                              (+ .bias of each with bias=True: mlp_bias)
    LoRALinear   peft.tuners.lora.Linear (adapter "default")  base_layer.weight, base_layer.bias,
                                                              lora_A.default.weight, lora_B.default.weight

The ops run on the process default backend (fusedlm.set_backend / use_backend).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops.lora import lora_linear
from .ops.norm import layer_norm, rms_norm
from .ops.swiglu import swiglu


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last dim (fusedlm.rms_norm).

    Llama's RMSNorm with offset=0 (weight starts at ones), Gemma's ``(1 + weight)`` with offset=1
    (weight starts at zeros). forward(x, residual=None) returns the normed x in x's dtype, or
    ``(normed, x + residual)`` with a residual (the fused pre-norm residual add). Unlike LlamaRMSNorm,
    a float32 weight with a half-precision x gives x's dtype (not float32) back.
    """

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.variance_epsilon = eps  # Hugging Face's attribute name
        self.offset = offset

    @property
    def eps(self):  # the same number under both names, settable under both (transformers sets either)
        return self.variance_epsilon

    @eps.setter
    def eps(self, value):
        self.variance_epsilon = value

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.variance_epsilon, offset=self.offset, residual=residual)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}"


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last dim (fusedlm.layer_norm), ``bias=False`` for no shift.

    forward(x, residual=None): as :class:`RMSNorm`. Output in x's dtype.
    """

    def __init__(self, hidden_size, eps=1e-5, bias=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None

    def forward(self, x, residual=None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}"


class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotary position embedding, Llama's (``rotate_half``) layout.

    dim: the rotary dim R (the head dim, or less for partial rotary), even. base: rope_theta.
    forward(positions) with integer positions (S,) or (B, S) returns (cos, sin) of shape (S, dim) or
    (B, S, dim): ``cos[..., i] = cos(p * inv_freq[i mod dim/2])``, the two halves repeated, ready for
    fusedlm.apply_rotary_pos_emb (which accepts both shapes) or Hugging Face's.

    The table for positions 0 .. max_position_embeddings - 1 is computed once in float32 exactly as
    transformers' LlamaRotaryEmbedding does, and kept as non-persistent buffers: it follows the
    module's device and dtype (``.to(...)``, ``.half()``), and the returned cos / sin have the dtype of
    the table: float32 unless the module was cast (then the float32 values rounded once to that dtype).
    In eager mode a larger position grows the table (reading the largest position costs one device
    sync); under torch.compile the table is not grown, so keep positions below its length there
    (``extend(n)`` beforehand makes room).
    """

    def __init__(self, dim, max_position_embeddings=2048, base=10000.0, device=None):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even rotary dimension >= 2, got {dim}")
        self.dim, self.base = dim, float(base)
        self.max_position_embeddings = max_position_embeddings
        cos, sin = self._table(max_position_embeddings, device)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _table(self, length, device):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        pos = torch.arange(length, device=device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def extend(self, length):
        """Make the table cover positions 0 .. length - 1 (no-op when it already does)."""
        if length > self.cos_cached.shape[0]:
            cos, sin = self._table(length, self.cos_cached.device)
            self.cos_cached = cos.to(self.cos_cached.dtype)
            self.sin_cached = sin.to(self.sin_cached.dtype)

    def forward(self, positions):
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions: expected a torch.Tensor, got {type(positions).__name__}")
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"positions: expected an integer tensor, got {positions.dtype}")
        if positions.dim() not in (1, 2):
            raise ValueError(f"positions: expected a 1-D (S,) or 2-D (B, S) tensor, got shape {tuple(positions.shape)}")
        if positions.device != self.cos_cached.device:
            raise ValueError(f"positions: expected a tensor on {self.cos_cached.device} (the module's device), "
                             f"got {positions.device}")
        if not torch.compiler.is_compiling() and positions.numel() > 0:
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0:
                raise ValueError(f"positions: expected positions >= 0, got {lo}")
            self.extend(hi + 1)
        return self.cos_cached[positions], self.sin_cached[positions]

    def extra_repr(self):
        return f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, base={self.base}"


class SwiGLUMLP(nn.Module):
    """Llama's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the fused fusedlm.swiglu."""

    def __init__(self, hidden_size, intermediate_size, bias=False, device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class LoRALinear(nn.Module):
    """A linear layer with a LoRA adapter: ``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``,
    run as one fused op (fusedlm.lora_linear), ``scaling = alpha / r``.

    Laid out as PEFT's ``lora.Linear`` with its one adapter named ``adapter_name`` ("default"):
    ``base_layer`` (an nn.Linear), ``lora_A[adapter_name]`` (nn.Linear(in, r), weight (r, in)),
    ``lora_B[adapter_name]`` (nn.Linear(r, out), weight (out, r)), ``lora_dropout[adapter_name]``, so
    the state dict of a PEFT LoRA layer loads unchanged (and ours into PEFT's). PEFT's *saved adapter*
    files drop the adapter name (``...lora_A.weight``); load those with PEFT, or insert ".default".

    Initialised as PEFT does by default: lora_A Kaiming-uniform, lora_B zeros (the adapter starts as a
    no-op). LoRA weights in another dtype than x (PEFT keeps them float32 under a half-precision base)
    are cast to x's dtype for the op; their gradients come back in their own dtype. Under torch.autocast
    x, the base weight and bias are cast to the autocast dtype first, as nn.Linear's would be.
    Dropout is active in training mode only. ``merge()`` folds ``scaling * B @ A`` into the base weight
    (forward is then a plain linear), ``unmerge()`` subtracts it again (up to the weight dtype's rounding).
    """

    def __init__(self, in_features, out_features, r, alpha, dropout=0.0, bias=True, adapter_name="default",
                 device=None, dtype=None, *, base_layer=None):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive integer rank, got {r!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        elif (base_layer.in_features, base_layer.out_features) != (in_features, out_features):
            raise ValueError(f"base_layer: expected (in_features, out_features) = {(in_features, out_features)}, "
                             f"got {(base_layer.in_features, base_layer.out_features)}")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.adapter_name = r, alpha, adapter_name
        self.scaling = alpha / r
        kw = dict(bias=False, device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.ModuleDict({adapter_name: nn.Linear(in_features, r, **kw)})
        self.lora_B = nn.ModuleDict({adapter_name: nn.Linear(r, out_features, **kw)})
        self.lora_dropout = nn.ModuleDict({adapter_name: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear, r, alpha, dropout=0.0, adapter_name="default"):
        """Wrap an existing nn.Linear, kept as ``base_layer`` (its parameters shared, not copied); the
        adapter is created on the linear's device and in its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, r, alpha, dropout, adapter_name=adapter_name,
                   base_layer=linear)

    def reset_lora_parameters(self):
        """PEFT's default init: lora_A Kaiming-uniform (a = sqrt(5)), lora_B zeros."""
        nn.init.kaiming_uniform_(self.lora_A[self.adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[self.adapter_name].weight)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def dropout_p(self):
        d = self.lora_dropout[self.adapter_name]
        return d.p if isinstance(d, nn.Dropout) else 0.0

    def delta_weight(self):
        """``scaling * lora_B.weight @ lora_A.weight`` (out, in), computed and returned in float32."""
        a = self.lora_A[self.adapter_name].weight
        b = self.lora_B[self.adapter_name].weight
        return self.scaling * (b.float() @ a.float())

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight; forward becomes a plain linear. No-op when merged."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the adapter back out of the base weight (exact up to the weight dtype's rounding).
        No-op when not merged."""
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.base_layer.weight, self.base_layer.bias)
        w, bias = self.base_layer.weight, self.base_layer.bias
        a = self.lora_A[self.adapter_name].weight
        b = self.lora_B[self.adapter_name].weight
        if torch.is_autocast_enabled(x.device.type):  # as F.linear would: everything in the autocast dtype
            dt = torch.get_autocast_dtype(x.device.type)
            x, w, bias = x.to(dt), w.to(dt), None if bias is None else bias.to(dt)
        return lora_linear(x, w, bias, a.to(x.dtype), b.to(x.dtype), self.scaling,
                           dropout_p=self.dropout_p if self.training else 0.0)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, dropout={self.dropout_p}, merged={self.merged}")
