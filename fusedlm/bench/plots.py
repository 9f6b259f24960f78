"""Plots of a run, when matplotlib is installed: the fraction of copy bandwidth of the memory-bound ops,
and attention's TFLOP/s against S per provider."""
from .cases import MEMORY_PROVIDERS
from .harness import MODES


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001 - the plots are optional
        return None


def plot_memory(rows, path):
    """Bar chart of the fraction of copy bandwidth per (op, mode) and provider; None without matplotlib."""
    from .registry import OWN_SUMMARY

    measured = [r for r in rows if r["kind"] == "memory" and r["frac_of_copy_bw"] and r["op"] not in OWN_SUMMARY]
    plt = _pyplot() if measured else None
    if plt is None:
        return None
    keys = list(dict.fromkeys(f"{r['op']}\n{r['mode']}" for r in measured))
    providers = [p for p in MEMORY_PROVIDERS if any(r["provider"] == p for r in measured)]
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    for i, p in enumerate(providers):
        vals = {f"{r['op']}\n{r['mode']}": r["frac_of_copy_bw"] for r in measured if r["provider"] == p}
        xs = [j + i * width for j, k in enumerate(keys) if k in vals]
        ax.bar(xs, [vals[k] for k in keys if k in vals], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("fraction of copy bandwidth")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title(f"{measured[0]['gpu']}, {measured[0]['dtype']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attention(rows, path):
    """TFLOP/s against S per provider for the dense attention op: a row of panels (one per mode) for
    non-causal, one for causal."""
    measured = [r for r in rows if r["op"] == "attention" and r["tflops"]]
    plt = _pyplot() if measured else None
    if plt is None:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in measured)]
    causals = sorted({r["params"]["causal"] for r in measured})
    fig, axes = plt.subplots(len(causals), len(modes), figsize=(3.8 * len(modes), 3.2 * len(causals)),
                             squeeze=False)
    seqlens = sorted({r["params"]["seqlen"] for r in measured})
    for i, causal in enumerate(causals):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in measured if r["params"]["causal"] == causal and r["mode"] == mode]
            for p in dict.fromkeys(r["provider"] for r in measured):
                pts = sorted((r["params"]["seqlen"], r["tflops"]) for r in sel if r["provider"] == p)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=p)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [str(x) for x in seqlens], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{mode}{', causal' if causal else ''}", fontsize=9)
            ax.axhline(measured[0]["matmul_tflops"] or 0, color="gray", lw=0.8, ls="--")
            ax.set_ylim(bottom=0)
            if i == len(causals) - 1:
                ax.set_xlabel("S (B = tokens / S)", fontsize=8)
        axes[i][0].set_ylabel("TFLOP/s (dashed: matmul)", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"attention, {measured[0]['gpu']}, {measured[0]['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# (key in write_outputs' paths, plot function, file name suffix)
PLOTS = (("png", plot_memory, ""), ("attention_png", plot_attention, "_attention"))
