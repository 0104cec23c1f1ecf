"""Pipeline parallelism (comm/parallel/pipeline.py, bubble.py): the split, the refusals and the bubble theory without
processes, then fp32 parity on gloo against the unsplit model trained side by side on the same global batch (the
pipeline splits it into microbatches): losses within 1e-5 every step, every parameter's gradient gathered over the
pipeline, the clipped global norm, parameter names and the gathered state dict.

One gloo job per world size runs every variant (spawning costs seconds, the checks milliseconds):
2 ranks: 1F1B with AdamW and clipping (6 steps, the group from a 3-D ("dp", "pp", "tp") DeviceMesh),
Interleaved1F1B with v=2 (5 SGD steps), refusals that need a group; 4 ranks: 1F1B (5 SGD steps), then every
other schedule torch offers for 2 steps each, and one measured bubble checked for consistency.
"""
from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from comm.parallel import bubble as B
from comm.parallel import pipeline as P
from tests.helpers import free_port, spawn

BATCH, SEQ = 8, 16


def _model(n_layers: int):
    from systems.model import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(n_layers=n_layers, dim=32, n_heads=2, ffn_dim=48, vocab_size=64, max_seq_len=SEQ))

# ---------------------------------------------------------------- no processes


def test_split_keeps_names_and_the_computation():
    model = _model(8)
    chunks = P.split_model(model, list(range(4)), 4)
    assert [n for c in chunks for n, _ in c.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [k for c in chunks for k in c.state_dict()] == list(model.state_dict())
    assert list(chunks[1].state_dict())[0] == "model.layers.2.input_layernorm.weight"
    assert chunks[0].lm_head is None and chunks[3].model.embed_tokens is None and chunks[1].model.norm is None
    x = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(2))
    h = x
    for c in chunks:
        h = c(h)
    assert torch.equal(chunks[-1].loss(h, y), model(x, y))  # the same operations in the same order
    with pytest.raises(RuntimeError, match="the loss runs on the last stage"):
        chunks[0].loss(h, y)
    assert P.stage_indices("Interleaved1F1B", 1, 4, 2) == [1, 5]
    assert P.stage_indices("ZBVZeroBubble", 1, 4, 2) == [1, 6] and P.stage_indices("DualPipeV", 0, 4, 2) == [0, 7]
    assert P.stage_indices("1F1B", 3, 4, 1) == [3]


@pytest.mark.parametrize("args,words", [
    (("PipeDream", 4, 1, 8, 8), ["unknown pipeline schedule 'PipeDream'", "GPipe, 1F1B, Interleaved1F1B",
                                 "ZBVZeroBubble, DualPipeV"]),
    (("1F1B", 4, 1, 6), ["4*1 = 4", "model.n_layers=6"]),
    (("Interleaved1F1B", 4, 2, 12), ["4*2 = 8", "model.n_layers=12"]),
    (("GPipe", 2, 2, 8), ["one stage per rank", "virtual stages=2"]),
    (("ZBVZeroBubble", 2, 1, 8), ["exactly 2 stages per rank"]),
    (("1F1B", 4, 1, 8, 3), ["1F1B with pp=4", "at least pp = 4 microbatches", "got 3"]),
    (("Interleaved1F1B", 4, 2, 8, 9), ["divisible by its rounds", "= 2", "m=9"]),
    (("InterleavedZeroBubble", 2, 2, 8, 5), ["divisible by its rounds", "= 2", "m=5"]),
    (("DualPipeV", 4, 2, 8, 6), ["at least 2*pp = 8 microbatches", "got 6"]),
    (("GPipe", 2, 1, 8, 0), ["n_microbatches=0"]),
])
def test_refusals_name_the_reason(args, words):
    with pytest.raises(ValueError) as e:
        P.check_layout(*args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_accepts_what_torch_runs():
    P.check_layout("gpipe", 4, 1, 8, 1)  # case-insensitive, as torch
    P.check_layout("Interleaved1F1B", 4, 2, 8, 3)  # fewer microbatches than ranks: one round
    P.check_layout("ZBVZeroBubble", 4, 2, 8, 4)
    assert P.schedule_traits("dualpipev").torch_name == "DualPipeV"


@pytest.mark.parametrize("name,v", [("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("Interleaved1F1B", 4),
                                    ("LoopedBFS", 2), ("InterleavedZeroBubble", 1), ("InterleavedZeroBubble", 2),
                                    ("DualPipeV", 2)])
def test_papers_formulas_equal_torchs_action_lists(name, v):
    """At equal times (T_F = T_B = T_W) and m a multiple of 2p the closed forms are exactly what torch's own action
    lists give when list-scheduled: (p-1)/(m+p-1), (p-1)/(vm+p-1), ZB-H1 (p-1)/(3vm+p-1), DualPipe with F&B = F+B
    (p-1)/(3m+p-1) (its pairs' results are sent after the pair, which the simulation models)."""
    for p, m in ((2, 4), (4, 8), (4, 16)):
        assert B.simulated_bubble(name, p, m, v) == pytest.approx(B.bubble_formula(name, p, m, v)), (p, m)
    assert B.bubble_formula("GPipe", 4, 8) == pytest.approx(3 / 11)
    assert B.bubble_formula("Interleaved1F1B", 4, 8, 2) == pytest.approx(3 / 19)
    assert B.bubble_formula("InterleavedZeroBubble", 4, 8, 2) == pytest.approx(3 / 51)
    assert B.bubble_formula("DualPipeV", 4, 8, 2) == pytest.approx(3 / 27)


def test_zbv_simulated_against_its_paper():
    """torch's ZB-V at equal times keeps (p-1) chunk forwards of start-up idle: 3/51 at p=4, m=8 (as interleaved
    ZB-H1), where the paper's closed form says 0; a slower forward opens more gaps, as the form says."""
    assert B.simulated_bubble("ZBVZeroBubble", 4, 8, 2) == pytest.approx(3 / 51)
    assert B.bubble_formula("ZBVZeroBubble", 4, 8, 2) == 0.0
    assert B.simulated_bubble("ZBVZeroBubble", 4, 8, 2, t_f=2.0) > B.simulated_bubble("ZBVZeroBubble", 4, 8, 2)
    assert B.bubble_formula("ZBVZeroBubble", 4, 8, 2, t_f=2.0) > 0


def test_held_sends_delay_the_next_rank():
    """An overlapped pair's first result leaves with the second: the downstream forward waits for both."""
    acts = {0: [("F", 0, 0, True), ("F", 0, 1)], 1: [("F", 1, 0), ("F", 1, 1)]}
    cost = lambda s, k: 1.0  # noqa: E731
    assert B.simulate_bubble(acts, cost)["span"] == 4.0  # stage 1 starts at 2, not 1
    assert B.simulate_bubble({0: [("F", 0, 0), ("F", 0, 1)], 1: acts[1]}, cost)["span"] == 3.0


def test_simulation_refuses_a_deadlock():
    bad = {0: [("F", 0, 0), ("B", 0, 0)], 1: [("B", 1, 0), ("F", 1, 0)]}  # stage 1 backward before its forward
    with pytest.raises(RuntimeError, match="deadlocks"):
        B.simulate_bubble(bad, B.unit_cost(1))

# ---------------------------------------------------------------- gloo workers


def _batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def _side_by_side(ref, pipe: P.Pipeline, *, steps: int, optim: str, clip: float | None, where: str) -> None:
    """``steps`` steps of ``ref`` (the whole batch) and ``pipe`` (the same batch in microbatches): losses, every
    gathered gradient and the clipped norm compared each step, then the gathered state dict."""
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1)}[optim]
    opt_ref, opt_pp = make(ref.parameters()), make(pipe.parameters())
    names = {n for n, _ in ref.named_parameters()}
    for step in range(steps):
        x, y = _batch(step, ref.config.vocab_size)
        loss_ref = ref(x, y)
        loss_ref.backward()
        loss_pp = pipe.step(x, y)
        assert abs(loss_ref.item() - loss_pp.item()) < 1e-5, (where, step, loss_ref.item(), loss_pp.item())
        grads = P.full_grads(pipe.chunks, pipe.group)
        assert set(grads) == names, (where, names ^ set(grads))
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"{where} step {step} grad {n}")
        if clip is not None:
            norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            norm_pp = P.clip_grad_norm_(pipe.parameters(), clip, pipe.group)
            assert norm_ref > clip and abs(norm_ref.item() - norm_pp.item()) < 1e-5 * norm_ref.item(), (where, step)
        opt_ref.step(), opt_pp.step()
        opt_ref.zero_grad(), opt_pp.zero_grad()
    full = P.full_state_dict(pipe.chunks, pipe.group)
    assert list(full) == list(ref.state_dict()), where
    for n, v in ref.state_dict().items():
        # atol 1e-5: AdamW divides by sqrt(v), so fp32 rounding in a near-zero gradient moves a weight ~1e-6
        torch.testing.assert_close(full[n], v, rtol=0, atol=1e-5, msg=f"{where} param {n}")


def _run(group, *, n_layers: int, schedule: str, m: int, v: int | None = None, steps: int,
         optim: str = "sgd", clip: float | None = None) -> P.Pipeline:
    ref = _model(n_layers)
    pipe = P.build_pipeline(copy.deepcopy(ref), group, schedule=schedule, n_microbatches=m, virtual_stages=v)
    rank, p = dist.get_rank(pipe.group), dist.get_world_size(pipe.group)
    own = {n for n, _ in pipe.named_parameters()}
    layers = {n.split(".")[2] for n in own if n.startswith("model.layers.")}
    assert len(layers) == n_layers // p, (schedule, rank, sorted(layers))  # this rank holds its share only
    assert ("model.embed_tokens.weight" in own) == (0 in pipe.knobs["stages"]), (schedule, rank)
    assert ("lm_head.weight" in own) == (p * pipe.knobs["virtual_stages"] - 1 in pipe.knobs["stages"])
    _side_by_side(ref, pipe, steps=steps, optim=optim, clip=clip, where=f"{schedule} pp={p} v={v} m={m}")
    return pipe


def _refusals(group) -> None:
    with pytest.raises(ValueError, match=r"2\*1 = 2 does not divide model.n_layers=3"):
        P.build_stages(_model(3), group, schedule="1F1B")
    chunks, stages = P.build_stages(_model(2), group, schedule="1F1B")
    with pytest.raises(ValueError, match=r"at least pp = 2 microbatches \(torch.s Schedule1F1B\), got 1"):
        P.build_schedule("1F1B", stages, 1)
    with pytest.raises(ValueError, match="valid ones .* GPipe, 1F1B"):
        P.build_schedule("PipeDream", stages, 2)
    with pytest.raises(ValueError, match="exactly 2 stages per rank"):
        P.build_schedule("ZBVZeroBubble", stages, 4)
    _, looped = P.build_stages(_model(4), group, schedule="Interleaved1F1B", virtual_stages=2)
    with pytest.raises(ValueError, match=r"holds stages \[\d, \d\] but ZBVZeroBubble places \[\d, \d\]"):
        P.build_schedule("ZBVZeroBubble", looped, 4)  # loop layout [r, r+2] vs the V's [r, 3-r]
    pipe = P.build_pipeline(_model(2), group, schedule="GPipe", n_microbatches=2)
    x, y = _batch(0, 64)
    with pytest.raises(ValueError, match="does not split into 3 equal microbatches|3 rows"):
        P.pipeline_step(pipe.schedule, pipe.stages, x[:3], y[:3])


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _worker_pp2(rank: int, world: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("dp", "pp", "tp"))
        assert P.as_pp_group(mesh).size() == 2
        _run(mesh, n_layers=4, schedule="1F1B", m=4, steps=6, optim="adamw", clip=0.5)
        _run(None, n_layers=4, schedule="Interleaved1F1B", v=2, m=4, steps=5)
        _refusals(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _worker_pp4(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        _run(None, n_layers=8, schedule="1F1B", m=4, steps=5)
        for name, v, m in [("GPipe", 1, 4), ("Interleaved1F1B", 2, 8), ("LoopedBFS", 2, 8),
                           ("InterleavedZeroBubble", 2, 8), ("ZBVZeroBubble", 2, 8), ("DualPipeV", 2, 8)]:
            pipe = _run(None, n_layers=8, schedule=name, v=v, m=m, steps=2)
        _measured_bubble_is_consistent(pipe)  # the last one: DualPipeV, I/W split and overlapped F&B pairs
    finally:
        dist.destroy_process_group()


def _measured_bubble_is_consistent(pipe: P.Pipeline) -> None:
    """A measured step: busy within the step, every compute call of this rank timed, and the simulation from the
    measured costs runs on torch's action list (no claim about the value: 4 ranks share 2 CPUs here)."""
    timer = B.StageTimer(pipe.schedule, pipe.stages)
    x, y = _batch(0, 64)
    res, loss = B.measure_step(lambda: pipe.step(x, y), timer, pipe.group)
    assert 0 < res.busy_s <= res.span_s <= res.step_s and 0 <= res.bubble < 1, res
    m, v = pipe.knobs["n_microbatches"], pipe.knobs["virtual_stages"]
    kinds = {k.split("@")[0] for k in res.costs}
    assert kinds >= {"F", "B"} or kinds >= {"F", "I", "W"}, kinds
    assert sum(len(t) for k, t in res.costs.items() if k[0] == "F") == m * v
    parts: list = [None] * dist.get_world_size(pipe.group)
    dist.all_gather_object(parts, res.costs, group=pipe.group)
    sim = B.simulate_bubble(B.schedule_actions("DualPipeV", len(parts), v, m), B.measured_cost(B.merge_costs(parts)))
    assert 0 <= sim["mean"] < 1 and len(sim["per_rank"]) == len(parts)
    assert torch.isfinite(loss)


def test_pp2_matches_unsplit_model():
    spawn(_worker_pp2, (2, free_port()), 2, timeout_s=90)


def test_pp4_every_schedule_matches_unsplit_model():
    spawn(_worker_pp4, (4, free_port()), 4, timeout_s=90)
