#!/usr/bin/env python3
"""A full training step of a Llama-1B-shaped model (issue 19): tokens/s and peak memory per provider.

Llama-3.2-1B's shape with random weights (hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64,
intermediate 8192, vocab 128256, tied embeddings, rope_theta 500000), bf16 weights, a batch of B x S random
tokens (default 4 x 2048) with labels = input_ids (the models shift them), and one step = forward with the
loss + backward + torch.optim.AdamW(lr 1e-5, fused=True on CUDA; its states in bf16, as the weights) step +
zero_grad. Every provider starts from the same weights and sees the same batch.

Providers (each on its own model, made after the previous one is freed):
  hf-sdpa          transformers' LlamaForCausalLM, attn_implementation="sdpa" (its loss: the float32 logits
                   through F.cross_entropy)
  hf-liger         the same model with liger_kernel.transformers.apply_liger_kernel_to_llama(model=...,
                   rope, rms_norm, swiglu, fused_linear_cross_entropy=True): every Liger kernel, its fused
                   loss included; CUDA only
  fusedlm-patched  the same model after fusedlm.integrations.hf.patch_model(model) (attention, RMSNorm,
                   SwiGLU, rotary, residual adds; the loss as the patch leaves it)
  fusedlm-model    fusedlm.models.LlamaForCausalLM.from_hf(model): fusedlm's own model, every kernel
Global patches (Liger's and fusedlm's rotary function in transformers' modeling_llama) are undone after each
provider. Timing: warm-up steps (compiles, autotuning), then the median of timed steps, each synchronised;
tokens/s = B S / median step time. Peak memory: torch.cuda.max_memory_allocated over the timed steps
(weights, gradients, optimizer states and activations). The first step's loss is compared with hf-sdpa's
(same weights, same batch): a fusedlm provider off by more than 2e-2 relative (1e-4 in float32) fails the
run.

    python benchmarks/bench_train_step.py [--quick] [--batch 4] [--seqlen 2048] [--providers hf-sdpa,...]
    python benchmarks/bench_train_step.py --cpu-smoke [--backend torch]   # a tiny model, float32, on the CPU

Results: train_step_<gpu>.json (a row per provider) and .md in --out (default benchmarks/results/, a temp
dir with --cpu-smoke). Exit status 0 when every fusedlm provider ran and agreed, 1 when one failed or
disagreed, 2 when it cannot run here (no CUDA device without --cpu-smoke).
"""
import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PROVIDERS = ("hf-sdpa", "hf-liger", "fusedlm-patched", "fusedlm-model")
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu")
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu")
LOSS_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


class Unavailable(RuntimeError):
    """A provider that cannot run here (peer not installed, needs CUDA): a row, not a failure."""
    status = "unavailable"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench_train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", default="all", help=f"comma list of {list(PROVIDERS)} (default: all)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --cpu-smoke)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 2048; 32 with --cpu-smoke)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 16, Llama-3.2-1B's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 warm-up and 5 timed steps")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a tiny model (2 layers, hidden 64, vocab 256) in float32 on the CPU, 1 + 2 steps: checks "
                        "the script, not a performance figure")
    p.add_argument("--backend", choices=["auto", "cuda", "triton", "torch"], default=None,
                   help="fusedlm's process default backend (fusedlm.set_backend; default: FUSEDLM_BACKEND or auto)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--tag", default="train_step", help="file name prefix (default train_step)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.providers = PROVIDERS if args.providers in ("", "all") else tuple(
        x.strip() for x in args.providers.split(",") if x.strip())
    unknown = set(args.providers) - set(PROVIDERS)
    if unknown:
        p.error(f"--providers: unknown {sorted(unknown)}; expected {list(PROVIDERS)}")
    smoke = args.cpu_smoke
    args.batch = args.batch or (2 if smoke else 4)
    args.seqlen = args.seqlen or (32 if smoke else 2048)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2 if args.quick else 3)
    args.steps = args.steps or (2 if smoke else 5 if args.quick else 10)
    return args


# --------------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------------

def hf_model(config, state, device, dtype):
    """transformers' LlamaForCausalLM (sdpa) built on the device in dtype, holding ``state``'s weights."""
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.train()


class _GlobalPatches:
    """Undo what a provider patches in transformers' modeling_llama (Liger's and fusedlm's rotary function,
    Liger's RMSNorm / MLP classes): the module's globals, and the rotary object's attributes when
    transformers made it an nn.Module."""

    def __enter__(self):
        from transformers.models.llama import modeling_llama as m

        self.m, self.saved = m, dict(vars(m))
        rot = self.saved.get("apply_rotary_pos_emb")
        self.rot_dict = dict(vars(rot)) if isinstance(rot, torch.nn.Module) else None
        return self

    def __exit__(self, *exc):
        for k in [k for k in vars(self.m) if k not in self.saved]:
            delattr(self.m, k)
        for k, v in self.saved.items():
            setattr(self.m, k, v)
        if self.rot_dict is not None:
            rot = self.saved["apply_rotary_pos_emb"]
            rot.__dict__.clear()
            rot.__dict__.update(self.rot_dict)
        return False


def build(provider, config, state, device, dtype):
    """-> (model, note) for one provider."""
    model = hf_model(config, state, device, dtype)
    if provider == "hf-sdpa":
        return model, ""
    if provider == "hf-liger":
        if device.type != "cuda":
            raise Unavailable("Liger-Kernel runs Triton kernels on CUDA tensors only")
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except Exception as e:  # noqa: BLE001 - not installed or not importable
            raise Unavailable(f"liger_kernel is not importable ({type(e).__name__}: {e}); pip install liger-kernel") \
                from None
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
        return model, "rope, rms_norm, swiglu, fused_linear_cross_entropy"
    if provider == "fusedlm-patched":
        from fusedlm.integrations.hf import patch_model

        counts = patch_model(model)
        return model, ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    if provider == "fusedlm-model":
        from fusedlm.models import LlamaForCausalLM

        with torch.device(device):
            ours = LlamaForCausalLM.from_hf(model)
        del model
        return ours.train(), "fusedlm.models.LlamaForCausalLM.from_hf"
    raise ValueError(provider)


# --------------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(provider, args, config, state, batch, device, dtype):
    """Build the provider's model and optimizer, run the warm-up and timed steps -> the row's numbers."""
    model, note = build(provider, config, state, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ids = batch

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    first = float(step())  # the loss of the weights every provider starts from
    for _ in range(args.warmup - 1):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, opt, params
    return {"median_ms": statistics.median(times), "step_ms": times, "peak_mem_bytes": peak, "loss_first": first,
            "note": note}


def run(args):
    from transformers import LlamaConfig

    from fusedlm.bench.measure import environment

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = dict(TINY if smoke else LLAMA_1B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape)
    env = environment(device)
    env["transformers"] = _version("transformers")
    env["cut_cross_entropy"] = _version("cut-cross-entropy")
    torch.manual_seed(args.seed)
    state = {k: v.detach().clone() for k, v in hf_model(config, None, device, dtype).state_dict().items()}
    _free(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), generator=gen).to(device)
    tokens = args.batch * args.seqlen
    n_params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight" or not config.tie_word_embeddings)
    rows, ref_loss = [], None
    for provider in args.providers:
        row = {"kind": "train_step", "op": "llama_train_step", "provider": provider, "batch": args.batch,
               "seqlen": args.seqlen, "tokens": tokens, "layers": config.num_hidden_layers,
               "hidden": config.hidden_size, "vocab": config.vocab_size, "params": n_params,
               "dtype": str(dtype).replace("torch.", ""), "warmup": args.warmup, "steps": args.steps,
               "median_ms": None, "tokens_per_s": None, "peak_mem_bytes": None, "loss_first": None,
               "loss_rel_diff": None, "loss_vs": None, "note": None, "error": None, "status": "ok",
               "fusedlm_backend": _fusedlm_backend(), "smoke": smoke, **env}
        try:
            with _GlobalPatches():
                row.update(measure(provider, args, config, state, batch, device, dtype))
            row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
        except Unavailable as e:
            row.update(error=str(e), status=e.status)
        except torch.OutOfMemoryError as e:
            row.update(error=f"out of memory ({str(e).splitlines()[0][:200]})", status="oom")
        except Exception as e:  # noqa: BLE001 - one provider failing must not stop the others
            row.update(error=f"{type(e).__name__}: {e}"[:400], status="failed")
        _free(device)
        if row["loss_first"] is not None:
            if provider == "hf-sdpa":
                ref_loss = row["loss_first"]
            if ref_loss is not None:
                row["loss_rel_diff"] = abs(row["loss_first"] - ref_loss) / abs(ref_loss)
                row["loss_vs"] = "hf-sdpa"
        rows.append(row)
        _print_row(row)
    return rows, LOSS_TOL[dtype]


def _fusedlm_backend():
    from fusedlm import _backend

    return _backend.get_backend()


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------------

def _print_row(r):
    if r["median_ms"] is None:
        print(f"  {r['provider']:16s} {r['status']}: {r['error']}", flush=True)
        return
    peak = f"{r['peak_mem_bytes'] / 2**30:6.2f} GiB peak" if r["peak_mem_bytes"] is not None else ""
    diff = f"  loss {r['loss_first']:.5f} (rel diff {r['loss_rel_diff']:.1e} vs hf-sdpa)" \
        if r["loss_rel_diff"] is not None else f"  loss {r['loss_first']:.5f}"
    print(f"  {r['provider']:16s} {r['median_ms']:9.2f} ms/step {r['tokens_per_s']:10.0f} tokens/s {peak}{diff}",
          flush=True)


def markdown(rows, tol):
    r0 = rows[0]
    lines = ["# Llama-1B-shaped training step", ""]
    if r0["smoke"]:
        lines += ["**CPU SMOKE TEST: a tiny model in float32. These times check the script; they are not "
                  "performance figures.**", ""]
    lines += [f"{r0['gpu']} · torch {r0['torch']} · triton {r0['triton']} · transformers {r0['transformers']} · "
              f"liger-kernel {r0['liger_kernel'] or 'not installed'} · fusedlm {r0['fusedlm']} · commit "
              f"{r0['git_commit'] or 'unknown'} · {r0['date']}", "",
              f"{r0['layers']} layers, hidden {r0['hidden']}, vocab {r0['vocab']}, {r0['params'] / 1e9:.2f} B "
              f"parameters, {r0['dtype']}; batch {r0['batch']} x {r0['seqlen']} tokens; forward + loss + backward + "
              f"AdamW step; median of {r0['steps']} steps after {r0['warmup']} warm-up. Peak: "
              "torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer states, "
              f"activations). Loss: the first step's, relative difference to hf-sdpa's (flag above {tol:g}).", "",
              "| provider | ms / step | tokens/s | vs hf-sdpa | peak GiB | first loss | rel diff | what |",
              "|---|---|---|---|---|---|---|---|"]
    base = next((r["median_ms"] for r in rows if r["provider"] == "hf-sdpa" and r["median_ms"]), None)
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"| {r['provider']} | {r['status']} | — | — | — | — | — | {r['error']} |")
            continue
        peak = "—" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f}"
        speed = f"{base / r['median_ms']:.2f}x" if base else "—"
        diff = "—" if r["loss_rel_diff"] is None else f"{r['loss_rel_diff']:.1e}" + (
            " **check**" if r["loss_rel_diff"] > tol else "")
        lines.append(f"| {r['provider']} | {r['median_ms']:.2f} | {r['tokens_per_s']:.0f} | {speed} | {peak} | "
                     f"{r['loss_first']:.5f} | {diff} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_train_step: no CUDA device here; run it on a GPU machine, or use --cpu-smoke",
              file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_train_step: transformers is not installed", file=sys.stderr)
        return 2
    if args.backend:
        from fusedlm import _backend

        _backend.set_backend(None if args.backend == "auto" else args.backend)
    rows, tol = run(args)
    from fusedlm.bench.cli import _slug, default_out

    out = args.out or default_out(args.cpu_smoke)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.tag}_{'cpu-smoke' if args.cpu_smoke else _slug(rows[0]['gpu'])}"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows, tol)
    (out / f"{stem}.md").write_text(md)
    print("\n" + md)
    print(f"results: {out / (stem + '.json')}, {out / (stem + '.md')}")
    ours = [r for r in rows if r["provider"].startswith("fusedlm-")]
    bad = [r for r in ours if r["status"] != "ok" or (r["loss_rel_diff"] is not None and not r["loss_rel_diff"] <= tol)]
    for r in bad:
        print(f"FAILED {r['provider']}: {r['error'] or 'first loss off hf-sdpa by %.2e' % r['loss_rel_diff']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
