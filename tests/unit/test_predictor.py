"""Cluster-scale predictor: analytic cases of each formula, and the validation numbers the docs quote."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from analysis import flops, predictor as pr

BAICHUAN = pr.load_model("baichuan_7b")
A800 = pr.CLUSTERS["a800_1024"]
ALL = pr.TECHNIQUES["all"]


def _predict(cluster=A800, tech=ALL, **kw):
    return pr.predict(BAICHUAN, cluster, tech, **({"seq_len": 4096, "micro_batch": 1} | kw))


def test_ring_allreduce_matches_hand_computed():
    alpha, bw, n = 10e-6, 100e9, 1e9
    assert pr.ring_allreduce_s(n, 2, alpha, bw) == pytest.approx(2 * alpha + 1.0 * n / bw)  # 2(p-1)=2, 2(p-1)/p=1
    assert pr.ring_allreduce_s(n, 8, alpha, bw) == pytest.approx(14 * alpha + 1.75 * n / bw)
    assert pr.ring_allreduce_s(n, 1, alpha, bw) == 0.0


def test_hierarchical_equals_flat_on_one_node_and_wins_across_nodes():
    one_node = pr.CLUSTERS["a100_8"]
    for kind in ("allreduce", "reducescatter", "allgather"):
        assert pr.collective_s(kind, 1e9, one_node, "hierarchical") == pytest.approx(
            pr.collective_s(kind, 1e9, one_node, "flat"))
    assert pr.collective_s("allreduce", 1e9, A800, "hierarchical") < pr.collective_s("allreduce", 1e9, A800, "flat")


def test_korthikanti_formula_and_recompute_lower_memory():
    s, b, h, a = 2048, 1, 4096, 32
    none = pr.korthikanti_activation_bytes(seq=s, micro_batch=b, dim=h, heads=a)
    assert none == 34 * s * b * h + 5 * a * s * s * b  # paper, eq. 1: sbh(34 + 5as/h)
    selective = pr.korthikanti_activation_bytes(seq=s, micro_batch=b, dim=h, heads=a, recompute="selective")
    full = pr.korthikanti_activation_bytes(seq=s, micro_batch=b, dim=h, heads=a, recompute="full")
    assert selective == 34 * s * b * h and full == 2 * s * b * h and full < selective < none
    sel = replace(ALL, recompute="selective", flash_attn=False)
    assert _predict(tech=sel).peak_memory_bytes < _predict(tech=replace(sel, recompute="none")).peak_memory_bytes


def test_zero_shards_model_states():
    p, dp = 1000, 10
    assert pr.model_state_bytes(p, "bf16", 0, dp) == 16 * p
    assert pr.model_state_bytes(p, "bf16", 2, dp) == pytest.approx(p * (2 + 14 / dp))
    assert pr.model_state_bytes(p, "bf16", 3, dp) == pytest.approx(16 * p / dp)


def test_young_daly_and_goodput():
    assert pr.young_interval_s(10.0, 20000.0) == pytest.approx(math.sqrt(2 * 10 * 20000))
    assert pr.daly_interval_s(10.0, 20000.0) == pytest.approx(pr.young_interval_s(10.0, 20000.0), rel=0.02)
    assert pr.goodput(600.0, 6.0, 300.0, math.inf) == pytest.approx(1 - 6 / 600)
    rates = [pr.goodput(600.0, 6.0, 300.0, m) for m in (1e6, 1e5, 1e4)]
    assert rates[0] > rates[1] > rates[2]


def test_mfu_is_tflops_over_peak_under_palm():
    p = _predict()
    assert p.convention == "palm"
    assert p.mfu == pytest.approx(p.tflops_per_gpu / A800.peak_tflops["bf16"])
    palm = flops.flops_per_token(n_layers=32, dim=4096, ffn_dim=11008, vocab_size=64000, seq_len=4096)["palm"]
    assert BAICHUAN.model_flops_per_token(4096) == palm
    assert p.tflops_per_gpu == pytest.approx(p.tokens_per_s_per_gpu * palm / 1e12)


def test_overlap_never_slower_and_buckets_cost_alphas():
    for collective in pr.COLLECTIVES:
        tech = replace(ALL, collective=collective)
        assert _predict(tech=tech).step_s <= _predict(tech=replace(tech, overlap=False)).step_s
    small, _ = pr.bucketed_s("allreduce", 1e9, 1e6, A800, "hierarchical")
    large, _ = pr.bucketed_s("allreduce", 1e9, 1e8, A800, "hierarchical")
    assert small > large  # 1000 buckets pay 10x the latency terms of 10 buckets
    assert pr.bucket_bytes(ALL, 1024, 2) == 1024e6 * 2  # Megatron rule: 1M elements per rank above 40 ranks


def test_techniques_from_config_maps_chuanliu_keys():
    cfg = {"fusion": {"attention": "flash", "rmsnorm": "liger"},
           "splitting": {"recompute_attention": True, "chunked_ce": True},
           "precision": {"compute_dtype": "bf16"}, "comm": {"algorithm": {"name": "hierarchical"},
                                                             "overlap": {"enabled": False},
                                                             "bucket": {"policy": "gpu_count"}}}
    t = pr.techniques_from_config(cfg)
    assert (t.flash_attn, t.fused_ops, t.recompute, t.chunked_ce, t.collective, t.overlap, t.bucket_mb) == \
        (True, True, "selective", True, "hierarchical", False, None)
    assert pr.techniques_from_config({}) == pr.Techniques(flash_attn=True, overlap=True)  # lenient defaults
    assert pr.model_from_config({"model": {"n_layers": 2, "dim": 8, "n_heads": 2, "ffn_dim": 16,
                                           "vocab_size": 32}}).dim == 8


def test_validation_matches_docs_json():
    written = json.loads((Path(pr.REPO) / "docs" / "predictor_validation.json").read_text())
    rows = pr.validate()
    assert [r["case"] for r in rows] == [r["case"] for r in written]
    for got, doc in zip(rows, written):
        for key, err in got["error"].items():
            assert err == pytest.approx(doc["error"][key], abs=1e-9)
    # honest bounds (docs/predictor.md): MPT-7B seq 4096 within 5%, Baichuan within 10%, MPT seq 2048 within 15%
    bound = {"mpt_7b_a100_8_seq4096": 0.05, "baichuan_7b_a800_1024": 0.10, "mpt_7b_a100_8_seq2048": 0.15}
    for r in rows:
        assert all(abs(e) <= bound[r["case"]] for e in r["error"].values()), r["case"]
        assert r["fits_memory"]


@pytest.mark.parametrize("call, words", [
    (lambda: pr.get_cluster("tpu_v9"), "a800_1024"),
    (lambda: _predict(cluster=replace(A800, gpus=0)), "gpus > 0"),
    (lambda: _predict(seq_len=0), "positive"),
    (lambda: pr.load_model("gpt5"), "baichuan_7b"),
    (lambda: _predict(tech=replace(ALL, recompute="some")), "selective"),
    (lambda: pr.get_techniques("most"), "all"),
])
def test_bad_input_names_the_choices(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def _fake_run(root: Path, name: str, model: str, micro_batch: int, step_s: float) -> Path:
    """A run directory as experiments.train leaves it, with only what calibrate() reads."""
    from omegaconf import OmegaConf

    d = root / name
    (d / ".hydra").mkdir(parents=True)
    cfg = {"model": OmegaConf.to_container(OmegaConf.load(pr.REPO / "conf" / "model" / f"{model}.yaml")),
           "precision": {"compute_dtype": "fp32"}, "fusion": {"attention": "sdpa"}}
    (d / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    env = {"model": model, "seq_len": cfg["model"]["max_seq_len"], "micro_batch_size": micro_batch,
           "grad_accum_steps": 1, "world_size": 1, "peak_tflops": 0.2, "summary_warmup_steps": 1}
    (d / "summary.json").write_text(json.dumps({"environment": env, "median": {"perf/step_s": step_s}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "perf/step_s": step_s * (2 if i == 1 else 1)})
                                             + "\n" for i in range(1, 5)))
    return d


def test_calibration_recovers_a_known_machine(tmp_path):
    """Step times made by the predictor itself for e = 0.8, 20 GB/s and 5 ms per step are fitted back."""
    truth = pr.Efficiencies(gemm=0.8, flash_attn=0.8, hbm=1.0, step_overhead_s=0.005)
    cpu = pr.cpu_cluster(0.2, "fp32", 1, mem_gbps=20.0)
    tech = pr.Techniques(flash_attn=True, precision="fp32")
    runs = []
    for model, mb in [("tiny", 2), ("tiny", 16), ("small", 2), ("small", 8)]:
        m = pr.load_model(model)
        step = pr.predict(m, cpu, tech, seq_len=m_seq(model), micro_batch=mb, eff=truth).step_s
        runs.append(_fake_run(tmp_path, f"{model}_{mb}", model, mb, step))
    fit = pr.calibrate(runs)
    assert fit["efficiencies"]["gemm"] == pytest.approx(0.8, rel=1e-3)
    assert fit["cpu_mem_gbps"] == pytest.approx(20.0, rel=1e-3)
    assert fit["efficiencies"]["step_overhead_s"] == pytest.approx(0.005, rel=1e-3)
    assert all(abs(r["error"]) < 1e-3 for r in fit["runs"])  # the slow first step is not what counts
    with pytest.raises(ValueError, match="at least three runs"):
        pr.calibrate(runs[:2])


def m_seq(model: str) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(pr.REPO / "conf" / "model" / f"{model}.yaml").max_seq_len)
