"""``python -m analysis.predictor``: predict, fit, validate, and check the collective model.

    python -m analysis.predictor --model baichuan_7b --cluster a800_1024 --techniques all --interval
    python -m analysis.predictor --gpu h100_sxm --gpus 256 --nics 8 --nic-gbps 400 --model baichuan_7b
    python -m analysis.predictor --fit          # fit data/fit.json on the calibration half of the data set
    python -m analysis.predictor --validate     # every validation row, error per regime; docs/predictor_validation.json
    python -m analysis.predictor --baichuan     # Baichuan-7B's 182 TFLOPS / 58.3% as an interval
    python -m analysis.predictor --nccl         # the collective model vs published nccl-tests bus bandwidths
    python -m analysis.predictor --torchtitan   # independent check: torchtitan's tables, never in the data set
    python -m analysis.predictor --megatron     # tp x pp x dp vs Megatron-LM's table; docs/predictor_megatron.json
    python -m analysis.predictor --search --model baichuan_7b --cluster a800_1024 --global-batch 1024
                                                # rank the layouts (tp x pp x dp, schedule, micro-batch) that fit
    python -m analysis.predictor --tp 8 --pp 4 --schedule interleaved --virtual-stages 2 --micro-batch 1 --grad-accum 32
    python -m analysis.predictor --calibrate runs/a runs/b runs/c   # fit this CPU to its own runs
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from analysis.peaks import BAICHUAN_7B
from analysis.predictor import calibration, megatron_check, nccl_check, titan_check
from analysis.predictor.configs import REPO, load_model
from analysis.predictor.inputs import BAICHUAN_7B_RANGES, GB, Cluster, get_cluster, get_gpu, get_techniques
from analysis.predictor.interval import Interval, predict_interval
from analysis.predictor.parallel import Layout, predict_layout
from analysis.predictor.pipeline import SCHEDULES
from analysis.predictor.search import format_search, search_layouts
from analysis.predictor.step import Prediction

DOCS = REPO / "docs"


def _fmt_prediction(p: Prediction, cluster: Cluster) -> str:
    rows = [("step time", f"{p.step_s:.3f} s"), ("  compute", f"{p.compute_s:.3f} s"),
            ("  comm (total / exposed)", f"{p.comm_s:.3f} / {p.exposed_comm_s:.3f} s"),
            ("tokens/s/GPU", f"{p.tokens_per_s_per_gpu:,.0f}"),
            (f"TFLOPS/GPU ({p.convention})", f"{p.tflops_per_gpu:.1f}"), (f"MFU ({p.convention})", f"{p.mfu:.1%}"),
            ("HFU", f"{p.hfu:.1%}"),
            ("peak memory", (f"{p.peak_memory_bytes / GB:.1f} GB of {cluster.gpu.hbm_gb:g} "
                            f"({'fits' if p.fits_memory else 'DOES NOT FIT'})")),
            ("goodput (Young interval)", f"{p.goodput:.3f}"),
            ("effective tokens/s/GPU", f"{p.effective_tokens_per_s_per_gpu:,.0f}")]
    rows += [(f"  {k}", f"{v:.4g}") for k, v in p.breakdown.items()]
    return "\n".join(f"{k:<30} {v}" for k, v in rows)


def _fmt_interval(iv: Interval, published_mfu: float | None = None) -> str:
    lines = [(f"MFU point {iv.point.mfu:.1%}, interval [{iv.low.mfu:.1%}, {iv.high.mfu:.1%}] "
             f"({iv.low.tflops_per_gpu:.0f}-{iv.high.tflops_per_gpu:.0f} TFLOPS/GPU)")]
    for axis, values in iv.sensitivity.items():
        lines.append(f"  {axis:<14} " + "  ".join(f"{k}: {v:.1%}" for k, v in values.items()))
    if published_mfu is not None:
        lines.append(f"published {published_mfu:.1%}: {'inside' if iv.inside else 'OUTSIDE'} the interval; "
                     f"{len(iv.explaining)} of {len(iv.combinations)} assumption sets within 5% of it")
        for r in iv.explaining[:8]:
            fits = "" if r["fits_memory"] else " (does not fit in memory)"
            lines.append(f"    {r['assumption']} -> {r['mfu']:.1%}{fits}")
    if iv.infeasible:
        lines.append(f"{iv.infeasible} assumption sets left out of the interval: their memory does not fit the GPU")
    return "\n".join(lines)


def baichuan_interval(tech=None) -> Interval:
    """Baichuan-7B on 1024 A800s with its published choices; unpublished inputs as BAICHUAN_7B_RANGES."""
    return predict_interval(load_model("baichuan_7b"), get_cluster("a800_1024"), tech or get_techniques("all"),
                            seq_len=4096, micro_batch=1, grad_accum=1, ranges=BAICHUAN_7B_RANGES,
                            published_mfu=BAICHUAN_7B["mfu"])


def _fmt_validation(result: dict) -> str:
    lines = [f"{'row':<52} {'published':>9} {'predicted':>9} {'error':>7}  interval"]
    for e in result["validation"]:
        lo, hi = e["interval"]
        lines.append(f"{e['id'][:52]:<52} {e['published']:>9,.0f} {e['predicted']:>9,.0f} {e['error']:>+7.1%}  "
                     f"[{lo:,.0f}, {hi:,.0f}]{'' if e['inside'] else ' *'}")
    for half in ("validation", "calibration"):
        s = result[f"{half}_summary"]
        lines.append(f"\n{half} half: {s['rows']} rows, mean |error| {s['mean_abs_error']:.1%}, "
                     f"max {s['max_abs_error']:.1%}, over-predicted {s['over_predicted']}")
        lines += [f"  {k:<40} {v['rows']:>3} rows  mean |error| {v['mean_abs_error']:.1%}"
                  for k, v in s["regimes"].items()]
    g = result["goals"]
    lines.append(f"\ngoals: mean |error| <= {g['mean_abs_error_at_most']:.0%}: {'met' if g['met_mean'] else 'MISSED'}; "
                 f"regimes (>= 3 rows) over 15%: {g['regimes_over_15pct_with_3_rows'] or 'none'}")
    return "\n".join(lines)


def _write_check(result: dict, fmt, out: Path) -> None:
    """Print a check's table and record it under docs/ (the tests compare the record with a fresh run)."""
    print(fmt(result))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.predictor", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="baichuan_7b")
    ap.add_argument("--cluster", default="a800_1024", help="a preset (inputs.CLUSTERS) or cpu_local")
    ap.add_argument("--gpu", help="GPU type (a100_40, a100_80, a800, h100_sxm, h800, h200, h100_pcie)")
    ap.add_argument("--gpus", type=int, help="GPU count (default: the preset's)")
    ap.add_argument("--nics", type=int, help="NICs per node")
    ap.add_argument("--nic-gbps", type=float, help="Gb/s per NIC")
    ap.add_argument("--techniques", help="none | all | megatron (default: all; megatron for --search)")
    ap.add_argument("--nccl-algo", choices=("auto", "ring", "tree"), help="NCCL_ALGO (default: NCCL's own choice)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (per pipeline with --pp)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages")
    ap.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    ap.add_argument("--schedule", default="1f1b", choices=sorted(SCHEDULES),
                    help="pipeline schedule, the papers' name (comm/schedules.py maps torch's onto it)")
    ap.add_argument("--virtual-stages", type=int, default=1,
                    help="model chunks per GPU (interleaved, looped_bfs, zb_h1; zb_v and dualpipe_v run 2)")
    ap.add_argument("--search", action="store_true", help="rank the tp x pp x dp layouts that fit in memory")
    ap.add_argument("--global-batch", type=int, help="--search: sequences per step (default: 4M tokens / --seq)")
    ap.add_argument("--top", type=int, default=15, help="--search: rows to print")
    ap.add_argument("--interval", action="store_true", help="the interval over Baichuan-7B's unpublished inputs")
    ap.add_argument("--calibration", help="cpu_local calibration json (from --calibrate)")
    ap.add_argument("--json", help="write the prediction here")
    ap.add_argument("--fit", action="store_true", help="fit data/fit.json on the calibration half")
    ap.add_argument("--validate", action="store_true", help="predict the validation half; docs/predictor_validation.json")
    ap.add_argument("--baichuan", action="store_true", help="Baichuan-7B's published figure against the interval")
    ap.add_argument("--nccl", action="store_true", help="collective model vs published nccl-tests busbw")
    ap.add_argument("--torchtitan", action="store_true", help="independent check: torchtitan's published FSDP rows")
    ap.add_argument("--megatron", action="store_true",
                    help="tp x pp x dp vs Megatron-LM's weak-scaling table (never fitted); "
                         "docs/predictor_megatron.json")
    ap.add_argument("--calibrate", nargs="+", metavar="RUN_DIR", help="fit cpu_local to these runs")
    ap.add_argument("--out", help="where --calibrate writes (default: <first run's parent>/cpu_local_calibration.json)")
    args = ap.parse_args(argv)
    if args.fit:
        r = calibration.fit()
        print(json.dumps({k: r[k] for k in ("shared", "families")}, indent=1))
        s = r["calibration"]
        print(f"calibration half: {s['rows']} rows, mean |error| {s['mean_abs_error']:.1%}; wrote data/fit.json")
        return
    checks = {"validate": (calibration.validate, _fmt_validation, "predictor_validation.json"),
              "nccl": (nccl_check.check, nccl_check.format_check, "predictor_nccl.json"),
              "torchtitan": (titan_check.check, titan_check.format_check, "predictor_torchtitan.json"),
              "megatron": (megatron_check.check, megatron_check.format_check, "predictor_megatron.json")}
    for name, (check, fmt, filename) in checks.items():
        if getattr(args, name):
            _write_check(check(), fmt, DOCS / filename)
            return
    if args.baichuan:
        iv = baichuan_interval()
        print("Baichuan-7B, 1024 x A800, seq 4096, techniques=all (ZeRO-2, 1e8-element buckets, overlap)")
        print(_fmt_interval(iv, BAICHUAN_7B["mfu"]))
        return
    if args.calibrate:
        result = calibration.calibrate_local(args.calibrate)
        for r in result["runs"]:
            print(f"{r['run']:<40} measured {r['measured_step_s']:.3f} s  predicted {r['predicted_step_s']:.3f} s"
                  f"  error {r['error']:+.1%}")
        print(f"fitted GEMM efficiency {result['efficiencies']['gemm']:.3f}, memory {result['cpu_mem_gbps']:.1f} "
              f"GB/s, overhead {result['efficiencies']['step_overhead_s'] * 1e3:.2f} ms")
        out = Path(args.out) if args.out else Path(args.calibrate[0]).resolve().parent / "cpu_local_calibration.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return
    eff = None
    tech = get_techniques(args.techniques or ("megatron" if args.search else "all"))
    if args.nccl_algo:
        tech = replace(tech, nccl_algo=args.nccl_algo)
    if args.cluster == "cpu_local":
        if not args.calibration:
            raise SystemExit("cluster cpu_local needs --calibration <json written by --calibrate>")
        cluster, eff = calibration.load_local_calibration(args.calibration)
        tech = replace(tech, precision=next(iter(cluster.gpu.peak_override)), attention="flash")
    elif args.gpu:
        cluster = Cluster(name=args.gpu, gpu=get_gpu(args.gpu), gpus=args.gpus or 8)
    else:
        cluster = get_cluster(args.cluster)
    cluster = replace(cluster, **{k: v for k, v in (("gpus", args.gpus), ("nics_per_node", args.nics),
                                                    ("nic_gbps", args.nic_gbps)) if v is not None})
    model = load_model(args.model)
    if args.search:
        _search(args, model, cluster, tech, eff)
        return
    layout = Layout(tp=args.tp, pp=args.pp, sp=args.sp, schedule=args.schedule, virtual_stages=args.virtual_stages)
    p = predict_layout(model, cluster, tech, layout, seq_len=args.seq, micro_batch=args.micro_batch,
                       grad_accum=args.grad_accum, eff=eff)
    print(f"{args.model} on {cluster.gpus} x {cluster.gpu.name} ({cluster.nics_per_node} x {cluster.nic_gbps:g} Gb/s "
          f"per node), techniques={args.techniques or 'all'}, seq {args.seq}, micro-batch {args.micro_batch}, "
          f"grad-accum {args.grad_accum}" + (f", {layout.label()}" if layout.model_parallel > 1 else ""))
    print(_fmt_prediction(p, cluster))
    if args.interval:
        if layout.model_parallel > 1:
            raise ValueError("--interval covers data-parallel runs; drop --tp/--pp")
        ranges = replace(BAICHUAN_7B_RANGES, split=((args.micro_batch, args.grad_accum),))
        print(_fmt_interval(predict_interval(model, cluster, tech, seq_len=args.seq, micro_batch=args.micro_batch,
                                             grad_accum=args.grad_accum, ranges=ranges, eff=eff)))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(p), indent=1) + "\n")


def _search(args, model, cluster: Cluster, tech, eff) -> None:
    batch = args.global_batch or max(1, 4 * 2**20 // args.seq)
    result = search_layouts(model, cluster, tech, seq_len=args.seq, global_batch=batch, eff=eff)
    print(f"{args.model} on {cluster.gpus} x {cluster.gpu.name} ({cluster.nics_per_node} x {cluster.nic_gbps:g} Gb/s "
          f"per node), techniques={args.techniques or 'megatron'}, seq {args.seq}, global batch {batch} sequences; "
          "layouts that fit, by predicted tokens/s")
    print(format_search(result, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=1) + "\n")
