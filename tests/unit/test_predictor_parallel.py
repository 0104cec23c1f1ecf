"""Tensor, sequence and pipeline parallelism in the cluster predictor, each part against the papers' own numbers,
and the whole against Megatron-LM's published weak-scaling table, which nothing in the predictor was fitted on."""
import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest

from analysis import predictor as pr
from analysis.predictor import compute, dataset, megatron_check, memory, pipeline, tensor
from analysis.predictor.cli import main
from analysis.predictor.configs import REPO
from analysis.predictor.fitted import load_fit
from analysis.predictor.parallel import Layout, predict_layout, stage_params
from analysis.predictor.search import search_layouts
from analysis.predictor.titan_check import LLAMA3_70B

BAICHUAN = pr.load_model("baichuan_7b")
A800 = pr.get_cluster("a800_1024")
ALL = pr.get_techniques("all")
MEGATRON = pr.get_techniques("megatron")


# ----------------------------------------------------------------------------------------------- schedules
# The schedules' forms against the papers' numbers: tests/unit/test_schedules.py (comm/schedules.py, the shared table).


def test_predicted_bubble_is_the_schedules_on_megatrons_1t_run():
    """The 1T row of Narayanan et al. Table 1: p = 64, m = 512, 1F1B: 63/512 of the ideal, sends aside."""
    row = next(r for r in megatron_check.load_table() if r["id"] == "megatron_table1_1008b")
    inp = megatron_check.row_inputs(row)
    assert (inp["layout"].pp, inp["layout"].schedule, inp["grad_accum"]) == (64, "1f1b", 512)
    p = megatron_check._predict(inp)
    assert p.breakdown["bubble_fraction"] == pytest.approx(63 / 512, rel=0.05)
    interleaved = predict_layout(inp["model"], inp["cluster"], inp["tech"],
                                 replace(inp["layout"], schedule="interleaved", virtual_stages=2), seq_len=2048,
                                 micro_batch=1, grad_accum=512)
    assert interleaved.breakdown["bubble_fraction"] == pytest.approx(63 / 1024, rel=0.1)


# ----------------------------------------------------------------------------------------------- tp = pp = 1
@pytest.mark.parametrize("tech", [ALL, MEGATRON, replace(ALL, attention="eager", recompute="full", engine="ddp")])
def test_tp_pp_1_is_the_data_parallel_prediction_unchanged(tech):
    dp = pr.predict(BAICHUAN, A800, tech, seq_len=4096, micro_batch=2, grad_accum=4)
    assert asdict(predict_layout(BAICHUAN, A800, tech, Layout(), seq_len=4096, micro_batch=2, grad_accum=4)) == \
        asdict(dp)
    # the sharded compute and memory at tp = 1 are the unsharded ones, bit for bit
    eff = pr.Efficiencies()
    assert compute.micro_batch_terms(BAICHUAN, A800.gpu, tech, eff, 4096, 2, tp=1) == \
        compute.micro_batch_terms(BAICHUAN, A800.gpu, tech, eff, 4096, 2)
    assert compute.sharded_linears(BAICHUAN, 1) == BAICHUAN.linears()
    s, b, h, a = 4096, 2, 4096, 32
    assert memory.korthikanti_activation_bytes(seq=s, micro_batch=b, dim=h, heads=a, tp=1) == \
        34 * s * b * h + 5 * a * s * s * b


def test_tensor_parallel_ranks_share_the_gemms():
    """Column- and row-parallel slices: tp ranks together do exactly the unsharded layer's matmuls."""
    for tp in (2, 4, 8):
        sharded = sum(i * o for _, i, o in compute.sharded_linears(BAICHUAN, tp))
        assert sharded * tp == sum(i * o for _, i, o in BAICHUAN.linears())
    one = compute.micro_batch_terms(BAICHUAN, A800.gpu, MEGATRON, pr.Efficiencies(), 4096, 1)
    eight = compute.micro_batch_terms(BAICHUAN, A800.gpu, MEGATRON, pr.Efficiencies(), 4096, 1, tp=8)
    assert one.layer_forward_s / 8 < eight.layer_forward_s < one.layer_forward_s / 4  # smaller GEMMs run slower


# ----------------------------------------------------------------------------------------------- collectives
def test_tp_collectives_on_nvlink_within_a_node_and_sp_moves_the_same_volume():
    n = 1 * 4096 * 4096 * 2  # b x s x h in 16-bit
    tc = tensor.layer_comm(BAICHUAN, A800, MEGATRON, 8, False, 4096, 1)
    one_node = replace(A800, gpus=8)
    ar = pr.collective_s("allreduce", n, one_node, 8)
    assert tc.forward_s == pytest.approx(2 * ar) and tc.backward_s == pytest.approx(2 * ar)  # 2 + 2 per layer
    assert tensor.layer_comm(BAICHUAN, A800, MEGATRON, 16, False, 4096, 1).forward_s > tc.forward_s  # over IB
    sp = tensor.layer_comm(BAICHUAN, A800, MEGATRON, 8, True, 4096, 1)
    assert sp.forward_s == pytest.approx(tc.forward_s, rel=0.05) and sp.overlapped_s > 0
    full = tensor.layer_comm(BAICHUAN, A800, replace(MEGATRON, recompute="full"), 8, False, 4096, 1)
    assert full.backward_s == pytest.approx(tc.backward_s + tc.forward_s)  # the re-run forward's all-reduces
    assert tensor.layer_comm(BAICHUAN, A800, MEGATRON, 1, False, 4096, 1).forward_s == 0.0


def test_pipeline_sends_cross_the_inter_node_link():
    n = 4096 * 4096 * 2
    rail = A800.node_net_Bps / A800.gpus_per_node
    assert pipeline.p2p_s(n, A800, 1) == pytest.approx(n / rail, rel=0.02)
    # scatter/gather: 1/8 over each rail, then an NVLink all-gather (Narayanan et al. 2021 §4.1)
    assert pipeline.p2p_s(n, A800, 8) < pipeline.p2p_s(n, A800, 8, scatter_gather=False) / 3


# ----------------------------------------------------------------------------------------------- memory
def test_layout_memory_follows_korthikanti():
    """Korthikanti et al. 2022 Table 2 per layer, and the schedules' in-flight micro-batches on stage 1."""
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    kb = lambda **kw: memory.korthikanti_activation_bytes(seq=s, micro_batch=b, dim=h, heads=a, **kw)
    assert kb(tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert kb(tp=t, sp=True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert kb(tp=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert kb(tp=t, sp=True, recompute="selective") == pytest.approx(34 * sbh / t)
    assert (kb(tp=t, recompute="full"), kb(tp=t, sp=True, recompute="full")) == (2 * sbh, 2 * sbh / t)
    # weights, gradients and optimizer states are sharded by tp x pp: the stages' TP shards add up to the model
    tp, pp = 4, 4
    first, last = stage_params(BAICHUAN, tp, pp)
    middle = (first + last - BAICHUAN.vocab_size // tp * BAICHUAN.dim * 2) / 2
    assert (first + last + (pp - 2) * middle) * tp == pytest.approx(BAICHUAN.total_params(), rel=0.01)
    mem = {s: predict_layout(BAICHUAN, A800, MEGATRON, Layout(tp=2, pp=4, schedule=s), seq_len=4096, micro_batch=1,
                             grad_accum=16).peak_memory_bytes for s in ("gpipe", "1f1b", "zb_h1", "zb_h2")}
    assert mem["gpipe"] > mem["zb_h2"] > mem["1f1b"] == mem["zb_h1"]


# ----------------------------------------------------------------------------------------------- Megatron's table
def test_megatron_table_is_typed_as_published():
    """The CSV against the paper's own arithmetic: eq. 2 parameters, % of the 312 TFLOPS peak, aggregate
    PFLOP/s = TFLOPS x GPUs; the rows stay out of the data set and the fit."""
    rows = megatron_check.load_table()
    assert len(rows) == 10
    for r in rows:
        inp = megatron_check.row_inputs(r)
        m, tflops, gpus = inp["model"], float(r["tflops_per_gpu"]), int(r["gpus"])
        l, h, s, v = m.n_layers, m.dim, 2048, m.vocab_size
        eq2 = 12 * l * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * l * h))
        assert eq2 / 1e9 == pytest.approx(float(r["params_b"]), abs=0.051), r["id"]  # published to 0.1B
        assert m.total_params() == pytest.approx(eq2 + 2 * h)  # the paper's shape, + the final LayerNorm eq. 2 omits
        assert tflops / 312 == pytest.approx(float(r["pct_peak"]), abs=0.006), r["id"]
        assert tflops * gpus / 1000 == pytest.approx(float(r["aggregate_pflops"]), rel=0.01), r["id"]
    assert "megatron_weak_scaling.csv" not in dataset.RUN_FILES
    assert not {r["id"] for r in rows} & set(load_fit()["calibration_ids"])


def test_megatron_weak_scaling_rows_within_15_percent_and_match_the_docs():
    result = megatron_check.check()
    assert len(result["rows"]) == 10
    for r in result["rows"]:
        assert abs(r["error"]) <= megatron_check.GOAL, (r["id"], r["error"])
        assert r["fits_memory"], r["id"]  # each of them ran on 80 GB A100s
    written = json.loads((REPO / "docs" / "predictor_megatron.json").read_text())
    assert [r["predicted"] for r in written["rows"]] == pytest.approx([r["predicted"] for r in result["rows"]])


# ----------------------------------------------------------------------------------------------- search, refusals
def test_search_returns_only_layouts_that_fit_and_divide():
    cluster, batch = pr.get_cluster("a100_64"), 128
    result = search_layouts(LLAMA3_70B, cluster, MEGATRON, seq_len=4096, global_batch=batch)
    assert result.ranked and result.not_fitting > 0  # memory is what filters: 70B does not fit everywhere
    assert result.considered == len(result.ranked) + result.not_fitting
    for r in result.ranked:
        assert r["tp"] * r["pp"] * r["dp"] == cluster.gpus and r["tp"] <= cluster.gpus_per_node
        assert LLAMA3_70B.n_heads % r["tp"] == 0 and LLAMA3_70B.kv_heads % r["tp"] == 0
        assert LLAMA3_70B.n_layers % (r["pp"] * r["virtual_stages"]) == 0
        assert r["micro_batch"] * r["micro_batches"] * r["dp"] == batch
        assert r["memory_gb"] <= cluster.gpu.hbm_gb
    speeds = [r["tokens_per_s"] for r in result.ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert all(r["tp"] * r["pp"] > 1 for r in result.ranked)  # 70B with Adam needs model parallelism on 80 GB


@pytest.mark.parametrize("make, kw, words", [
    (lambda: Layout(tp=3), {}, "does not divide 1024 GPUs"),
    (lambda: Layout(tp=64), {}, "n_heads 32"),
    (lambda: Layout(pp=64), {}, "32 layers"),
    (lambda: Layout(pp=4, schedule="interleaved", virtual_stages=2), {"grad_accum": 6}, "multiple of pp 4"),
    (lambda: Layout(tp=2), {"tech": ALL}, "zero2 is not modelled"),
    (lambda: Layout(sp=True), {}, "tp > 1"),
    (lambda: Layout(pp=2, schedule="zb_v", virtual_stages=3), {}, "exactly 2 chunks"),
    (lambda: Layout(pp=2, virtual_stages=2), {}, "one chunk"),
    (lambda: Layout(pp=2, schedule="pipedream"), {}, "unknown pipeline schedule"),
])
def test_layouts_that_do_not_divide_are_refused(make, kw, words):
    with pytest.raises(ValueError, match=words):
        predict_layout(BAICHUAN, A800, kw.get("tech", MEGATRON), make(), seq_len=4096, micro_batch=1,
                       grad_accum=kw.get("grad_accum", 8))


def test_cli_search_prints_a_ranked_table_and_refuses_bad_layouts(capsys):
    main(["--search", "--model", "baichuan_7b", "--gpu", "a100_80", "--gpus", "16", "--global-batch", "64",
          "--top", "3"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "layouts that divide fit in memory" in out
    assert len([line for line in out.splitlines() if line[:3].strip() in ("1", "2", "3")]) == 3
    bad = subprocess.run([sys.executable, "-m", "analysis.predictor", "--tp", "3", "--gpus", "64"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not divide 64 GPUs" in bad.stderr and "Traceback" not in bad.stderr
