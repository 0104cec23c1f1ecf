"""The collective model held against published nccl-tests all-reduce bus bandwidths (data/nccl_allreduce.csv).

Each row names a cluster (GPU, nodes, NICs per node and their speed) and a message size; the model predicts the
busbw nccl-tests would print (``collectives.busbw_gbps``, NCCL's algorithm chosen as its tuner would, unless the
row states it). Nothing here is fitted: the link constants are NCCL's and the datasheets'.
"""
from __future__ import annotations

import csv
import statistics

from analysis.predictor.collectives import busbw_gbps
from analysis.predictor.dataset import DATA_DIR
from analysis.predictor.inputs import Cluster, get_gpu

NCCL_FILE = DATA_DIR / "nccl_allreduce.csv"
GOAL = 0.15


def check(path=NCCL_FILE) -> dict:
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            nodes, per = int(r["nodes"]), int(r["gpus_per_node"])
            cluster = Cluster(name=r["id"], gpu=get_gpu(r["gpu"].strip()), gpus=nodes * per, gpus_per_node=per,
                              nics_per_node=int(r["nics_per_node"]), nic_gbps=float(r["nic_gbps"]))
            algo = r["algorithm"].strip() if r["algorithm"].strip() in ("ring", "tree") else "auto"
            pred = busbw_gbps("allreduce", float(r["bytes"]), cluster, algo=algo)
            pub = float(r["busbw_gbps"])
            rows.append({"id": r["id"], "gpu": r["gpu"], "nodes": nodes, "gpus_per_node": per,
                         "network": f"{r['nics_per_node']} x {r['nic_gbps']} Gb/s {r['fabric']}",
                         "bytes": int(float(r["bytes"])), "algorithm": algo, "sharp": r["sharp"],
                         "published_busbw": pub, "predicted_busbw": pred, "error": (pred - pub) / pub,
                         "source": r["source"]})
    scored = [r for r in rows if r["sharp"] != "yes" and r["algorithm"] != "nvls"]
    multi = [r for r in scored if r["nodes"] > 1]
    errs = [abs(r["error"]) for r in multi]
    return {"rows": rows, "multi_node_rows": len(multi),
            "multi_node_mean_abs_error": statistics.fmean(errs) if errs else None,
            "multi_node_within_15pct": sum(e <= GOAL for e in errs),
            "note": "rows with SHARP or NVLS are shown but not scored: in-network reduction is not modelled"}


def format_check(result: dict) -> str:
    lines = [f"{'row':<44} {'GPUs':>9} {'network':<22} {'bytes':>11} {'pub':>6} {'pred':>6} {'error':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['id'][:44]:<44} {r['nodes']:>3}x{r['gpus_per_node']:<5} {r['network'][:22]:<22} "
                     f"{r['bytes']:>11,} {r['published_busbw']:>6.1f} {r['predicted_busbw']:>6.1f} "
                     f"{r['error']:>+7.1%}")
    m = result["multi_node_mean_abs_error"]
    lines.append(f"multi-node rows: {result['multi_node_rows']}, mean |error| "
                 f"{'n/a' if m is None else f'{m:.1%}'}, within 15%: {result['multi_node_within_15pct']}")
    return "\n".join(lines)
