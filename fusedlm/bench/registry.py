"""Every op the benchmarks know, in run order, and how ``--ops`` selects them."""
from . import ops_attention, ops_cross_entropy, ops_deberta, ops_kv_cache, ops_lora, ops_norm, ops_rope, ops_swiglu

ALL_OPS = [*ops_norm.OPS, *ops_swiglu.OPS, *ops_rope.OPS, *ops_kv_cache.OPS,   # memory-bound
           *ops_attention.OPS, *ops_lora.OPS, *ops_deberta.OPS,       # compute-bound
           *ops_cross_entropy.OPS]
OP_BY_NAME = {op.name: op for op in ALL_OPS}
# Families, plus "memory" and "compute" for every op of a kind.
FAMILIES = sorted({op.family for op in ALL_OPS} | {"memory", "compute"})
# Memory-bound ops with a report of their own (several cases, their own peers): left out of the generic
# memory-bound table and plot, whose columns are the norm ops' providers and whose lines are (op, mode).
OWN_SUMMARY = {op.name for op in ALL_OPS if op.kind == "memory" and op.report is not None}


def select_ops(spec):
    """'all', or a comma list of op names, families, "memory", "compute" -> ops in ALL_OPS order."""
    if spec in (None, "", "all"):
        return list(ALL_OPS)
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    unknown = wanted - set(OP_BY_NAME) - set(FAMILIES)
    if unknown:
        raise ValueError(f"--ops: unknown {sorted(unknown)}; expected op names {list(OP_BY_NAME)} "
                         f"or families {FAMILIES}")
    return [op for op in ALL_OPS if op.name in wanted or op.family in wanted or op.kind in wanted]


def default_tag(ops):
    """The results' file name prefix: all, memory_bound, a family, or the ops' names."""
    if len(ops) == len(ALL_OPS):
        return "all"
    if ops == [op for op in ALL_OPS if op.kind == "memory"]:
        return "memory_bound"
    for family in FAMILIES:
        if ops == [op for op in ALL_OPS if op.family == family or op.kind == family]:
            return family
    return "-".join(op.name for op in ops)
