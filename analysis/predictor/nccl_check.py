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
LARGE = 256 * 2**20


def check(path=NCCL_FILE) -> dict:
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            nodes, per = int(r["nodes"]), int(r["gpus_per_node"])
            nics, gbps = int(r["nics_per_node"]), float(r["nic_gbps"])
            if nodes > 1 and not (nics and gbps):
                raise ValueError(f"{path.name} row {r['id']}: a multi-node row needs nics_per_node and nic_gbps")
            cluster = Cluster(name=r["id"], gpu=get_gpu(r["gpu"].strip()), gpus=nodes * per, gpus_per_node=per,
                              nics_per_node=nics or 1, nic_gbps=gbps or 1.0)  # one node: the network is unused
            stated = r["algorithm"].strip()
            algo = {"nvls": "nvls" if nodes == 1 else "nvlstree"}.get(stated, stated if stated in ("ring", "tree")
                                                                         else "auto")
            pred = busbw_gbps("allreduce", float(r["bytes"]), cluster, algo=algo)
            pub = float(r["busbw_gbps"])
            rows.append({"id": r["id"], "gpu": r["gpu"], "nodes": nodes, "gpus_per_node": per,
                         "network": f"{r['nics_per_node']} x {r['nic_gbps']} Gb/s {r['fabric']}",
                         "bytes": int(float(r["bytes"])), "algorithm": algo, "sharp": r["sharp"],
                         "published_busbw": pub, "predicted_busbw": pred, "error": (pred - pub) / pub,
                         "flag": r["source_flag"], "source": r["source"]})
    groups = {
        "multi_node_large": [r for r in rows if r["nodes"] > 1 and r["bytes"] >= LARGE and not r["flag"]],
        "multi_node_mid": [r for r in rows if r["nodes"] > 1 and r["bytes"] < LARGE and not r["flag"]],
        "single_node": [r for r in rows if r["nodes"] == 1 and not r["flag"]],
        "flagged_by_source": [r for r in rows if r["flag"]]}
    summary = {}
    for name, group in groups.items():
        errs = [abs(r["error"]) for r in group]
        summary[name] = {"rows": len(group), "mean_abs_error": statistics.fmean(errs) if errs else None,
                         "median_abs_error": statistics.median(errs) if errs else None,
                         "within_15pct": sum(e <= GOAL for e in errs)}
    return {"rows": rows, "summary": summary,
            "note": "every row is predicted; the algorithm is the one the row states, else NCCL's choice. Rows whose "
                    "source calls them an old software stack or an underperforming cluster are scored apart; "
                    "large = at least 256 MiB, where nccl-tests' busbw saturates"}


def format_check(result: dict) -> str:
    lines = [f"{'row':<40} {'GPUs':>9} {'network':<22} {'bytes':>14} {'pub':>6} {'pred':>6} {'error':>7}  flag"]
    for r in result["rows"]:
        lines.append(f"{r['id'][:40]:<40} {r['nodes']:>3}x{r['gpus_per_node']:<5} {r['network'][:22]:<22} "
                     f"{r['bytes']:>14,} {r['published_busbw']:>6.1f} {r['predicted_busbw']:>6.1f} "
                     f"{r['error']:>+7.1%}  {r['flag']}")
    for name, s in result["summary"].items():
        m = "n/a" if s["mean_abs_error"] is None else f"{s['mean_abs_error']:.1%} (median {s['median_abs_error']:.1%})"
        lines.append(f"{name:<20} {s['rows']:>3} rows, mean |error| {m}, within 15%: {s['within_15pct']}")
    return "\n".join(lines)
