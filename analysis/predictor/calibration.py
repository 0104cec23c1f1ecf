"""Fitting the constants on the calibration half, validating on the other, and fitting this CPU from its runs.

``fit()`` fits, per GPU family, the best GEMM rate, the FlashAttention rate and the per-layer overhead, and,
shared by all, the GEMM contraction constant k0, the slowdown of compute by overlapped communication and the fp8
GEMM rate: least squares of log(predicted / published tokens/s/GPU) over the calibration rows, each row's
unpublished inputs at their point estimates, with weak priors (published microbenchmarks) so that a family with
few rows stays physical. It writes data/fit.json with the ids of the rows it used and the data's hash.

``validate()`` refuses to run when that record shows a validation row, or when the data changed since the fit;
then it predicts every validation row (point estimate and interval over the unpublished inputs) and reports the
error per regime (GPU type x model size x recomputation).
"""
from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from analysis.predictor import dataset
from analysis.predictor.compute import Efficiencies
from analysis.predictor.fitted import FIT_PATH, load_fit
from analysis.predictor.inputs import GPUS
from analysis.predictor.interval import predict_interval
from analysis.predictor.step import predict

# name: (prior, prior scale, lower, upper). The priors come from microbenchmarks, not from the data set:
# cuBLAS bf16 GEMMs reach ~0.8 of peak at best shapes (A100 and H100 MAMF); FlashAttention-2 fwd+bwd ~0.6 of
# peak on A100, ~0.35-0.45 on H100 (Dao 2023); a layer's forward+backward launches ~30 kernels (~0.1-0.3 ms with
# framework hooks); fp8 GEMMs ~0.6 of the fp8 peak with scaling; MPT's Triton flash-attention kernel ran at
# ~0.7 of FlashAttention-2's speed (Dao 2023 compares them).
FAMILY_PARAMS = {"gemm": (0.8, 0.15, 0.3, 1.0), "attn": (0.5, 0.25, 0.1, 1.0),
                 "layer_overhead_s": (2e-4, 1e-3, 0.0, 5e-3)}
SHARED_PARAMS = {"gemm_k0": (128.0, 256.0, 0.0, 2048.0), "overlap_slowdown": (0.1, 0.2, 0.0, 1.0),
                 "fp8_gemm": (0.6, 0.2, 0.2, 1.0), "triton_attn": (0.7, 0.2, 0.2, 1.2)}
PRIOR_WEIGHT = 0.05
MIN_FAMILY_ROWS = 2  # calibration rows a GPU type needs for constants of its own (else: the same silicon's)  # a prior residual counts as much as a 5% error on one row at one prior scale
GOALS = {"mean_abs_error": 0.10, "regime_abs_error": 0.15, "regime_min_rows": 3}


class FitIntegrityError(RuntimeError):
    """The recorded fit touched validation rows, or the data changed since; validating would be meaningless."""


def _point_prediction(row: dataset.Row, eff: Efficiencies) -> float:
    r = dataset.with_point(row)
    return predict(r.model, r.cluster, r.tech, seq_len=r.seq_len, micro_batch=r.micro_batch,
                   grad_accum=r.grad_accum, eff=eff).tokens_per_s_per_gpu


def _unpack(x, families: list[str]) -> dict[str, Efficiencies]:
    names_f, names_s = list(FAMILY_PARAMS), list(SHARED_PARAMS)
    x = [float(v) for v in x]
    shared = dict(zip(names_s, x[:len(names_s)]))
    out, i = {}, len(names_s)
    for fam in families:
        out[fam] = Efficiencies(**shared, **dict(zip(names_f, x[i:i + len(names_f)])))
        i += len(names_f)
    return out


def fit(rows: list[dataset.Row] | None = None, out: Path | None = FIT_PATH) -> dict:
    """Fit on the calibration half (never the validation half) and write data/fit.json."""
    import numpy as np
    from scipy.optimize import least_squares

    rows = dataset.load_rows() if rows is None else rows
    calib, _ = dataset.split(rows)
    if any(r.validation for r in calib):  # split() guarantees it; the record below is what --validate checks
        raise FitIntegrityError("a validation row reached the fit")
    counts = Counter(r.cluster.gpu.name for r in calib)
    # a GPU type with enough calibration rows gets constants of its own; one with fewer, its silicon's family's
    family_of = {name: name if n >= MIN_FAMILY_ROWS else GPUS[name].family for name, n in counts.items()}
    families = sorted(set(family_of.values()))
    params = list(SHARED_PARAMS.values()) + [p for _ in families for p in FAMILY_PARAMS.values()]
    x0 = np.array([p[0] for p in params])
    lo, hi = np.array([p[2] for p in params]), np.array([p[3] for p in params])

    def residuals(x):
        effs = _unpack(x, families)
        res = [math.log(_point_prediction(r, effs[family_of[r.cluster.gpu.name]]) / r.tokens_per_s_per_gpu)
               for r in calib]
        prior = [PRIOR_WEIGHT * (xi - p[0]) / p[1] for xi, p in zip(x, params)]
        return np.array(res + prior)

    sol = least_squares(residuals, x0, bounds=(lo, hi), x_scale=np.array([p[1] for p in params]),
                        diff_step=1e-3, max_nfev=400)
    effs = _unpack(sol.x, families)
    shared = {k: float(v) for k, v in zip(SHARED_PARAMS, sol.x[:len(SHARED_PARAMS)])}
    result = {
        "version": 1,
        "data_sha256": dataset.data_sha256(),
        "split_seed": dataset.SPLIT_SEED,
        "calibration_ids": sorted(r.id for r in calib),
        "shared": shared | {"hbm": Efficiencies().hbm},
        "families": {f: {k: float(getattr(e, k)) for k in FAMILY_PARAMS} for f, e in effs.items()},
        "method": "least squares of log(predicted/published tokens/s/GPU) over the calibration half, unpublished "
                  "inputs at their point estimates, weak priors from microbenchmarks (calibration.py)",
        "calibration": summarize(_evaluate(calib, effs_for=lambda r: effs[family_of[r.cluster.gpu.name]],
                                           intervals=False)),
    }
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
        load_fit.cache_clear()
    return result


def check_fit(fit_record: dict, rows: list[dataset.Row]) -> None:
    """Refuse when the recorded fit touched the validation half or the data changed since it was made."""
    calib, valid = dataset.split(rows)
    used = set(fit_record.get("calibration_ids", []))
    touched = sorted(used & {r.id for r in valid})
    if touched:
        raise FitIntegrityError(f"the fit in data/fit.json used {len(touched)} validation rows ({touched[:3]}...): "
                                "validation would be in-sample. Refit with `python -m analysis.predictor --fit`")
    if fit_record.get("split_seed") != dataset.SPLIT_SEED or used != {r.id for r in calib}:
        raise FitIntegrityError("data/fit.json was fitted on another split or other rows; refit with "
                                "`python -m analysis.predictor --fit`")
    if fit_record.get("data_sha256") != dataset.data_sha256():
        raise FitIntegrityError("the data set changed since data/fit.json was fitted; refit with "
                                "`python -m analysis.predictor --fit`")


def _evaluate(rows: list[dataset.Row], effs_for, intervals: bool = True) -> list[dict]:
    out = []
    for r in rows:
        eff = effs_for(r)
        pred = _point_prediction(r, eff)
        entry = {"id": r.id, "regime": dataset.regime(r), "model": r.model.name, "gpu": r.cluster.gpu.name,
                 "gpus": r.cluster.gpus, "seq_len": r.seq_len, "micro_batch": r.micro_batch,
                 "grad_accum": r.grad_accum, "engine": r.tech.engine, "recompute": r.tech.recompute,
                 "precision": r.tech.precision, "published": r.tokens_per_s_per_gpu, "predicted": pred,
                 "error": (pred - r.tokens_per_s_per_gpu) / r.tokens_per_s_per_gpu, "source": r.source}
        if intervals:
            iv = predict_interval(r.model, r.cluster, r.tech, seq_len=r.seq_len, micro_batch=r.micro_batch,
                                  grad_accum=r.grad_accum, ranges=r.ranges, eff=eff,
                                  published_tokens_per_s=r.tokens_per_s_per_gpu)
            entry |= {"interval": [iv.low.tokens_per_s_per_gpu, iv.high.tokens_per_s_per_gpu],
                      "inside": iv.inside}
        out.append(entry)
    return out


def summarize(entries: list[dict]) -> dict:
    by = defaultdict(list)
    for e in entries:
        by[e["regime"]].append(abs(e["error"]))
    errs = [abs(e["error"]) for e in entries]
    return {"rows": len(entries), "mean_abs_error": statistics.fmean(errs) if errs else None,
            "max_abs_error": max(errs, default=None),
            "over_predicted": int(sum(e["error"] > 0 for e in entries)),
            "regimes": {k: {"rows": len(v), "mean_abs_error": statistics.fmean(v)} for k, v in sorted(by.items())}}


def validate(rows: list[dataset.Row] | None = None) -> dict:
    """Every validation row predicted with the recorded fit; refuses if the fit is not out of sample."""
    rows = dataset.load_rows() if rows is None else rows
    record = load_fit()
    check_fit(record, rows)
    from analysis.predictor.fitted import efficiencies_for

    calib, valid = dataset.split(rows)
    v = _evaluate(valid, effs_for=lambda r: efficiencies_for(r.cluster.gpu, record))
    c = _evaluate(calib, effs_for=lambda r: efficiencies_for(r.cluster.gpu, record), intervals=False)
    vs, cs = summarize(v), summarize(c)
    bad = [k for k, s in vs["regimes"].items()
           if s["rows"] >= GOALS["regime_min_rows"] and s["mean_abs_error"] > GOALS["regime_abs_error"]]
    goals = {"mean_abs_error_at_most": GOALS["mean_abs_error"],
             "met_mean": vs["mean_abs_error"] is not None and vs["mean_abs_error"] <= GOALS["mean_abs_error"],
             "regimes_over_15pct_with_3_rows": bad, "met_regimes": not bad}
    return {"validation": v, "validation_summary": vs, "calibration": c, "calibration_summary": cs,
            "goals": goals, "fit": {k: record[k] for k in ("shared", "families", "method", "data_sha256")}}


# ----------------------------------------------------------------------------------------------- this CPU
def calibrate_local(run_dirs: list[str | Path]) -> dict:
    """Fit this machine (GEMM rate, memory bandwidth, per-step overhead) to its own measured runs.

    The runs' configs are read as the trainer typed them (configs.techniques_from_config); each run's fastest
    step after warm-up counts (on a shared CPU other processes only ever slow a step down)."""
    import numpy as np
    from scipy.optimize import least_squares

    from analysis.predictor.configs import cpu_cluster, load_run_case

    cases = [load_run_case(Path(d)) for d in run_dirs]
    if len(cases) < 3:
        raise ValueError("calibration needs at least three runs (three unknowns: efficiency, bandwidth, overhead)")

    def step_s(x, cs) -> float:
        gemm, mem_gbps, overhead = x
        cluster = cpu_cluster(cs["peak_tflops"], cs["tech"].gemm_dtype, cs["world_size"], mem_gbps=mem_gbps)
        eff = Efficiencies(gemm=gemm, attn=gemm, hbm=1.0, gemm_k0=0.0, layer_overhead_s=0.0,
                           overlap_slowdown=0.0, step_overhead_s=overhead)
        return predict(cs["model"], cluster, cs["tech"], seq_len=cs["seq"], micro_batch=cs["mb"],
                       grad_accum=cs["accum"], eff=eff).step_s

    ys = np.array([cs["measured_step_s"] for cs in cases])
    sol = least_squares(lambda x: np.array([step_s(x, cs) for cs in cases]) / ys - 1.0, np.array([0.7, 10.0, 0.0]),
                        bounds=([0.05, 0.1, 0.0], [1.0, 1000.0, 10.0]), x_scale=np.array([0.1, 5.0, 0.01]))
    gemm, mem_gbps, overhead = (float(v) for v in sol.x)
    runs = []
    for d, cs in zip(run_dirs, cases):
        pred = step_s(sol.x, cs)
        runs.append({"run": str(d), "model": cs["model"].name, "micro_batch": cs["mb"], "seq_len": cs["seq"],
                     "measured_step_s": cs["measured_step_s"], "predicted_step_s": pred,
                     "error": (pred - cs["measured_step_s"]) / cs["measured_step_s"]})
    first = cases[0]
    return {"cpu": {"peak_tflops": first["peak_tflops"], "dtype": first["tech"].gemm_dtype,
                    "world_size": first["world_size"], "mem_gbps": mem_gbps},
            "efficiencies": asdict(Efficiencies(gemm=gemm, attn=gemm, hbm=1.0, gemm_k0=0.0, layer_overhead_s=0.0,
                                                overlap_slowdown=0.0, step_overhead_s=overhead)),
            "cpu_mem_gbps": mem_gbps,
            "method": "least squares in relative error of each run's fastest step: FLOP time at the measured GEMM "
                      "peak / e, memory-bound bytes / bandwidth, a constant overhead (e capped at 1)",
            "runs": runs}


def load_local_calibration(path: str | Path):
    from analysis.predictor.configs import cpu_cluster

    data = json.loads(Path(path).read_text())
    cpu = data["cpu"]
    return (cpu_cluster(cpu["peak_tflops"], cpu["dtype"], cpu["world_size"], mem_gbps=cpu["mem_gbps"]),
            replace(Efficiencies(), **data["efficiencies"]))
