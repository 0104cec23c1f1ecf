"""Which tp x pp x dp layout (x schedule, micro-batch) trains a model fastest on a cluster, among those that fit.

``search_layouts(model, cluster, techniques, seq_len=, global_batch=)`` enumerates every layout that divides:

    tp          divisors of the GPUs per node (tensor parallelism stays on NVLink: Narayanan et al. 2021,
                takeaway 1) that divide the heads, the kv heads and the MLP width
    pp          divisors of the layers with tp x pp dividing the GPUs; dp = GPUs / (tp x pp)
    micro-batch each of ``micro_batches`` whose micro_batch x dp divides the global batch (m = the rest)
    sp          off and on when tp > 1
    schedule    for pp > 1 each of ``schedules``: interleaved with every v >= 2 that divides the stage's layers
                (and m divisible by pp), zb_v when 2 x pp divides the layers

predicts each (parallel.predict_layout; tp = pp = 1 is step.predict), drops those whose memory does not fit the
GPU (counted, not shown) and ranks the rest by tokens/s. The global batch is in sequences and fixed: a layout may
not change what is trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from analysis.predictor.compute import Efficiencies
from analysis.predictor.inputs import Cluster, ModelShape, Techniques
from analysis.predictor.parallel import Layout, predict_layout
from analysis.predictor.pipeline import SCHEDULES

MICRO_BATCHES = (1, 2, 4, 8)
PIPELINE_SCHEDULES = ("1f1b", "interleaved", "zb_h1", "zb_h2", "zb_v")


@dataclass(kw_only=True)
class SearchResult:
    ranked: list[dict] = field(default_factory=list)  # layouts that fit, fastest first
    considered: int = 0  # layouts that divide
    not_fitting: int = 0  # of those, how many need more memory than the GPU has


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _schedules(m: ModelShape, pp: int, micro_batches: int, schedules: tuple[str, ...]):
    if pp == 1:
        yield "1f1b", 1
        return
    per_stage = m.n_layers // pp
    for name in schedules:
        if name not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {name!r}; choose from {sorted(SCHEDULES)}")
        if name == "interleaved":
            if micro_batches % pp == 0:
                yield from ((name, v) for v in _divisors(per_stage) if v >= 2)
        elif name == "zb_v":
            if per_stage % 2 == 0:
                yield name, 2
        else:
            yield name, 1


def candidate_layouts(m: ModelShape, cluster: Cluster, *, global_batch: int,
                      micro_batches: tuple[int, ...] = MICRO_BATCHES,
                      schedules: tuple[str, ...] = PIPELINE_SCHEDULES):
    """(Layout, micro_batch, m) for every layout that divides (see the module docstring)."""
    for tp in _divisors(cluster.gpus_per_node):
        if cluster.gpus % tp or m.n_heads % tp or m.kv_heads % tp or m.ffn_dim % tp:
            continue
        for pp in _divisors(m.n_layers):
            if cluster.gpus % (tp * pp):
                continue
            dp = cluster.gpus // (tp * pp)
            for mb in micro_batches:
                if global_batch % (mb * dp):
                    continue
                accum = global_batch // (mb * dp)
                for name, v in _schedules(m, pp, accum, schedules):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        yield Layout(tp=tp, pp=pp, sp=sp, schedule=name, virtual_stages=v), mb, accum


def search_layouts(m: ModelShape, cluster: Cluster, tech: Techniques, *, seq_len: int, global_batch: int,
                   micro_batches: tuple[int, ...] = MICRO_BATCHES, schedules: tuple[str, ...] = PIPELINE_SCHEDULES,
                   eff: Efficiencies | None = None) -> SearchResult:
    if global_batch <= 0:
        raise ValueError(f"global batch must be a positive number of sequences (got {global_batch})")
    out = SearchResult()
    for layout, mb, accum in candidate_layouts(m, cluster, global_batch=global_batch, micro_batches=micro_batches,
                                               schedules=schedules):
        p = predict_layout(m, cluster, tech, layout, seq_len=seq_len, micro_batch=mb, grad_accum=accum, eff=eff)
        out.considered += 1
        if not p.fits_memory:
            out.not_fitting += 1
            continue
        out.ranked.append({"layout": layout.label(), "tp": layout.tp, "pp": layout.pp, "dp": layout.dp(cluster),
                           "sp": layout.sp, "schedule": layout.schedule, "virtual_stages": layout.chunks,
                           "micro_batch": mb, "micro_batches": accum, "tokens_per_s": p.tokens_per_s_per_gpu *
                           cluster.gpus, "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "mfu": p.mfu,
                           "step_s": p.step_s, "memory_gb": p.peak_memory_bytes / 1e9,
                           "bubble_fraction": p.breakdown.get("bubble_fraction", 0.0)})
    out.ranked.sort(key=lambda r: -r["tokens_per_s"])
    if not out.ranked:
        raise ValueError(f"no layout of {m.name} fits {cluster.gpus} x {cluster.gpu.name} ({cluster.gpu.hbm_gb:g} GB) "
                         f"at global batch {global_batch}: {out.considered} divide, none fits in memory; add GPUs, "
                         "or use recomputation or a smaller micro-batch")
    return out


def format_search(result: SearchResult, top: int = 15) -> str:
    lines = [f"{'#':>3} {'layout (tp x pp x dp)':<30} {'mb':>3} {'m':>5} {'tokens/s':>12} {'tok/s/GPU':>10} "
             f"{'MFU':>6} {'bubble':>7} {'memory':>8}"]
    for i, r in enumerate(result.ranked[:top], 1):
        lay = f"{r['tp']}x{r['pp']}x{r['dp']} {r['layout'].split(' ', 2)[-1]}{' sp' if r['sp'] else ''}"
        lines.append(f"{i:>3} {lay:<30} {r['micro_batch']:>3} {r['micro_batches']:>5} {r['tokens_per_s']:>12,.0f} "
                     f"{r['tokens_per_s_per_gpu']:>10,.0f} {r['mfu']:>6.1%} {r['bubble_fraction']:>7.1%} "
                     f"{r['memory_gb']:>6.1f}GB")
    lines.append(f"{len(result.ranked)} of {result.considered} layouts that divide fit in memory "
                 f"({result.not_fitting} do not); showing {min(top, len(result.ranked))}")
    return "\n".join(lines)
