"""LlamaForCausalLM.generate on the static KV cache (fusedlm/models/generation.py), against transformers.

Greedy tokens must equal transformers' generate (its DynamicCache, eager attention) on the same weights,
token for token, in float32: a batch of left-padded prompts of different lengths, eos then pad, early stop
when every sequence finished. Sampling is held to transformers' own logits warpers (temperature, top-k,
top-p): the sampled tokens lie in the set they keep, and a first-token histogram over many draws matches
their distribution. The decode step must compile with torch.compile(fullgraph=True) (which refuses
``.item()`` and Python branches on tensor values: the no-host-sync check on CPU) and give eager's tokens;
on a GPU it is captured in a CUDA graph and replayed.
"""
import pytest
import torch

import fusedlm
from fusedlm.models import LlamaForCausalLM
from fusedlm.models import generation as G

from helpers import RecordFusedOps, triton_or_skip

tf = pytest.importorskip("transformers")
VOCAB = 97
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)


def _hf_llama(**kw):
    """A tiny random transformers Llama (GQA, llama3 rope); no eos unless given. Untied embeddings and weights
    larger than the default: a tiny model with tied ones mostly repeats the prompt's last token."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_parameters=LLAMA3_ROPE,
                tie_word_embeddings=False, initializer_range=0.1, eos_token_id=None)
    base.update(kw)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**base)).eval()


def _prompts(seed=4, lengths=(11, 7, 4)):
    """ids (B, S) left-padded to the longest of ``lengths`` (pad id 0), attention_mask (B, S)."""
    S = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), S), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(S)[None] >= S - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _hf_generate(hf, ids, mask, max_new_tokens, **kw):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kw)


# ---------------------------------------------------------------------------------------------------
# Greedy against transformers


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("variant", ["gqa-llama3", "mha-linear-bias-tied"])
def test_greedy_equals_transformers(variant, use_kernels):
    kw = {} if variant == "gqa-llama3" else dict(
        num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0))
    hf = _hf_llama(**kw)
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    ids, mask = _prompts()
    want = _hf_generate(hf, ids, mask, 12, pad_token_id=0)
    got = ours.generate(ids, 12, attention_mask=mask)
    assert got.shape == (3, 11 + 12)
    assert torch.equal(got, want)
    assert torch.equal(ours.generate(ids[:1], 12), want[:1])  # no mask: every token real


def test_greedy_on_triton_kernels():
    """use_kernels=True on the Triton backend (the interpreter on CPU): kv_cache_attention's kernels run."""
    triton_or_skip()
    hf = _hf_llama(num_hidden_layers=1)
    ours = LlamaForCausalLM.from_hf(hf)
    ids, mask = _prompts(lengths=(6, 3))
    want = _hf_generate(hf, ids, mask, 4, pad_token_id=0)
    with fusedlm.use_backend("triton"), RecordFusedOps("kv_cache") as recorded:
        got = ours.generate(ids, 4, attention_mask=mask)
    assert torch.equal(got, want)
    names = {func.name() for func, _, _ in recorded.calls}
    assert {"fusedlm::kv_cache_append", "fusedlm::kv_cache_attention_fwd"} <= names, sorted(names)


def test_max_new_tokens_zero_and_one():
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=False)
    ids, mask = _prompts()
    assert torch.equal(ours.generate(ids, 0, attention_mask=mask), ids)
    assert torch.equal(ours.generate(ids, 1, attention_mask=mask), _hf_generate(hf, ids, mask, 1, pad_token_id=0))


# ---------------------------------------------------------------------------------------------------
# eos


def _fresh_token(new):
    """(row b, index j >= 1, token) of the first token of some row of ``new`` (B, n) not seen earlier in it."""
    for b, row in enumerate(new):
        for j in range(1, len(row)):
            if row[j] not in row[:j]:
                return b, j, int(row[j])
    raise AssertionError(f"no fresh token in {new.tolist()}")


@pytest.mark.parametrize("use_kernels", [False, True])
def test_eos_then_pad(use_kernels):
    """A sequence that emits eos goes on with pad; the others keep going; the output is max_new_tokens long."""
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    ids, mask = _prompts()
    S, n = ids.shape[1], 12
    free = _hf_generate(hf, ids, mask, n, pad_token_id=0)[:, S:]
    b, j, eos = _fresh_token(free)
    assert not (free == eos).any(1).all(), "every row would stop: pick another seed"
    want = _hf_generate(hf, ids, mask, n, eos_token_id=eos, pad_token_id=VOCAB - 1)
    got = ours.generate(ids, n, attention_mask=mask, eos_token_id=eos, pad_token_id=VOCAB - 1)
    assert torch.equal(got, want)
    assert got.shape == (3, S + n)
    assert got[b, S + j] == eos and (got[b, S + j + 1:] == VOCAB - 1).all()
    assert torch.equal(got[b, S:S + j], free[b, :j])


def test_stops_when_every_sequence_finished():
    """transformers returns fewer than max_new_tokens tokens once every sequence has emitted an eos (a list
    of eos ids here); so does ours, though it looks only every STOP_CHECK steps."""
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=False)
    ids, mask = _prompts()
    S, n = ids.shape[1], 3 * G.STOP_CHECK
    free = _hf_generate(hf, ids, mask, n, pad_token_id=0)[:, S:]
    eos = sorted({int(free[b, 2]) for b in range(3)})  # every row finishes by its third new token
    want = _hf_generate(hf, ids, mask, n, eos_token_id=eos, pad_token_id=0)
    got = ours.generate(ids, n, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert want.shape[1] <= S + 3
    assert torch.equal(got, want)


def test_eos_from_the_config():
    """eos_token_id=None: the model's (from transformers' generation config), as transformers' generate."""
    hf = _hf_llama()
    ids, mask = _prompts()
    S = ids.shape[1]
    eos = _fresh_token(_hf_generate(hf, ids, mask, 8, pad_token_id=0)[:, S:])[2]
    hf.generation_config.eos_token_id = eos
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=False)
    assert ours.config.eos_token_id == eos
    assert torch.equal(ours.generate(ids, 8, attention_mask=mask, pad_token_id=0),
                       _hf_generate(hf, ids, mask, 8, pad_token_id=0))


# ---------------------------------------------------------------------------------------------------
# Sampling


def _sample(ours, ids, mask, seed, n=10, **kw):
    return ours.generate(ids, n, attention_mask=mask, do_sample=True, generator=torch.Generator().manual_seed(seed),
                         **kw)


def test_sampling_reproducible_and_top_k_one_is_greedy():
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=False)
    ids, mask = _prompts()
    a = _sample(ours, ids, mask, 1, temperature=1.5)
    assert torch.equal(a, _sample(ours, ids, mask, 1, temperature=1.5))
    assert not torch.equal(a, _sample(ours, ids, mask, 2, temperature=1.5))
    assert torch.equal(a[:, :ids.shape[1]], ids)
    greedy = _hf_generate(hf, ids, mask, 10, pad_token_id=0)
    assert torch.equal(_sample(ours, ids, mask, 3, temperature=0.7, top_k=1), greedy)
    assert torch.equal(_sample(ours, ids, mask, 3, top_p=1e-6), greedy)  # the nucleus is the top token


def _hf_warped(logits, temperature=1.0, top_k=None, top_p=None):
    """transformers' own logits warpers, in its order: (B, V) -> (B, V) with -inf outside the kept set."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k is not None else []
    warpers += [TopPLogitsWarper(top_p)] if top_p is not None else []
    for w in warpers:
        logits = w(None, logits)
    return logits


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(temperature=1.3, top_p=0.5), dict(top_k=6, top_p=0.7)])
def test_sampled_tokens_lie_in_the_kept_set(kw):
    """Every sampled token is one transformers' warpers keep, given transformers' logits for the sequence
    generated so far (the model run afresh on it, no cache)."""
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=False)
    ids, mask = _prompts()
    S, n = ids.shape[1], 10
    out = _sample(ours, ids, mask, 5, n=n, **kw)
    full_mask = torch.cat([mask, torch.ones(3, n, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = hf(out, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    kept = _hf_warped(logits[:, S - 1:-1].flatten(0, 1), **kw).isfinite()  # (B * n, V)
    assert kept.gather(1, out[:, S:].reshape(-1, 1)).all()
    assert (kept.sum(1) < VOCAB).all()  # the filter did remove tokens


@pytest.mark.parametrize("kw", [dict(temperature=1.5, top_k=12, top_p=0.9), dict(temperature=0.7, top_p=0.6)])
def test_pick_distribution(kw):
    """100000 draws of the sampler from one row of transformers' logits against transformers' warped softmax:
    no token outside the kept set, total variation under 0.015 (0.003 to 0.007 from the draws alone, seen
    over seeds; a missed temperature, top-k or top-p moves it by 0.05 and more on these logits)."""
    hf = _hf_llama()
    ids, _ = _prompts(lengths=(5,))
    with torch.no_grad():
        logits = hf(ids).logits[:, -1]  # (1, V)
    p = _hf_warped(logits, **kw).softmax(-1)[0].double()
    N = 100_000
    noise = torch.empty(N, VOCAB).exponential_(generator=torch.Generator().manual_seed(7))
    draws = G.pick(logits.expand(N, -1), G.Sampling(True, **kw), noise)
    freq = torch.bincount(draws, minlength=VOCAB).double() / N
    assert (freq[p == 0] == 0).all()
    tv = 0.5 * (freq - p).abs().sum()
    assert tv < 0.015, f"total variation {tv:.4f} over {(p > 0).sum()} kept tokens"


# ---------------------------------------------------------------------------------------------------
# The decode step: compiled whole, no host sync


def _prefilled(ours, B=3, S=5, capacity=16):
    cache = G.StaticCache.allocate(ours, B, capacity)
    ids = torch.randint(1, VOCAB, (B, S), generator=torch.Generator().manual_seed(9)).to(cache.seqlens.device)
    with torch.no_grad():
        G.forward_cached(ours, ids, cache)
    cache.seqlens.fill_(S)
    return cache


def _clone(cache):
    return G.StaticCache([k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.seqlens.clone(),
                         cache.cos, cache.sin)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_step_compiles_fullgraph(use_kernels):
    """torch.compile(fullgraph=True) of decode_step (sampling, eos) gives eager's tokens, lengths and cache;
    fullgraph raises on .item() or on a Python branch on a tensor's value, so this is the no-sync check
    (kv_cache_attention's CPU check of the lengths against the capacity is skipped while tracing)."""
    ours = LlamaForCausalLM.from_hf(_hf_llama(), use_kernels=use_kernels)
    fusedlm.set_backend("torch")
    eager_cache = _prefilled(ours)
    compiled_cache = _clone(eager_cache)
    step = torch.compile(G.decode_step, fullgraph=True, backend="aot_eager")
    eos, sampling = torch.tensor([3, 5]), G.Sampling(True, 0.8, 20, 0.9)
    token, finished = torch.tensor([3, 40, 41]), torch.tensor([False, False, True])
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # outside no_grad: the step turns grad off itself
        noise = torch.empty(3, VOCAB).exponential_(generator=gen)
        want = G.decode_step(ours, eager_cache, token, finished, eos, 0, sampling, noise)
        got = step(ours, compiled_cache, token, finished, eos, 0, sampling, noise)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        token, finished = want
    assert torch.equal(compiled_cache.seqlens, eager_cache.seqlens) and (eager_cache.seqlens == 8).all()
    for a, b in zip(compiled_cache.keys + compiled_cache.values, eager_cache.keys + eager_cache.values):
        torch.testing.assert_close(a, b)
    assert finished[2] and token[2] == 0  # finished before: pad


def test_generate_with_compiled_step(monkeypatch):
    """generate(compile=True) runs the compiled step (aot_eager here: inductor takes ~30 s on CPU)."""
    monkeypatch.setattr(G, "_compiled", torch.compile(G.decode_step, fullgraph=True, backend="aot_eager"))
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=False)
    ids, mask = _prompts()
    assert torch.equal(ours.generate(ids, 6, attention_mask=mask, compile=True),
                       _hf_generate(hf, ids, mask, 6, pad_token_id=0))


def test_generate_compiled_on_the_default_backend(monkeypatch):
    """generate(compile=True) on the fast path with the process default ("auto") backend: backend selection
    happens inside the compiled step (it once read cuda_verified.json there, which dynamo cannot trace)."""
    monkeypatch.setattr(G, "_compiled", torch.compile(G.decode_step, fullgraph=True, backend="aot_eager"))
    fusedlm.set_backend(None)
    hf = _hf_llama()
    ours = LlamaForCausalLM.from_hf(hf, use_kernels=True)
    ids, mask = _prompts()
    assert torch.equal(ours.generate(ids, 4, attention_mask=mask, compile=True),
                       _hf_generate(hf, ids, mask, 4, pad_token_id=0))


def test_decode_step_cuda_graph(gpu):
    """The decode step captured in a CUDA graph and replayed equals eager, step after step (fast path, the
    process default backend; sampling noise and the last token fed through static buffers)."""
    ours = LlamaForCausalLM.from_hf(_hf_llama().to(gpu))
    eager_cache = _prefilled(ours)
    graph_cache, warm_cache = _clone(eager_cache), _clone(eager_cache)
    eos, sampling = torch.tensor([3], device=gpu), G.Sampling(True, 0.8, 20, 0.9)
    token = torch.tensor([3, 40, 41], device=gpu)
    finished = torch.zeros(3, dtype=torch.bool, device=gpu)
    noise = torch.empty(3, VOCAB, device=gpu).exponential_()
    static = [token.clone(), finished.clone(), noise.clone()]
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (kernel compilation) outside the capture
            G.decode_step(ours, warm_cache, *static[:2], eos, 0, sampling, static[2])
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = G.decode_step(ours, graph_cache, *static[:2], eos, 0, sampling, static[2])
        gen = torch.Generator(device=gpu).manual_seed(0)
        for _ in range(4):
            noise = torch.empty(3, VOCAB, device=gpu).exponential_(generator=gen)
            want = G.decode_step(ours, eager_cache, token, finished, eos, 0, sampling, noise)
            static[2].copy_(noise)
            graph.replay()
            assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
            token, finished = want
            static[0].copy_(out[0])
            static[1].copy_(out[1])
    assert torch.equal(graph_cache.seqlens, eager_cache.seqlens)


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, top_k=0), "top_k"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(attention_mask=torch.ones(3, 4)), "attention_mask"),
])
def test_bad_input_raises(kw, match):
    ours = LlamaForCausalLM.from_hf(_hf_llama(num_hidden_layers=1), use_kernels=False)
    ids, _ = _prompts()
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=match):
        ours.generate(ids, **kw)
