"""engine=megatron on two real gloo processes: parity with the DDP reference, overlap on and off, buckets.

One spawned job trains every case (spawning and importing megatron-core cost seconds, a tiny step milliseconds):
the tiny Baichuan model, the same seed and the same per-rank data, three optimizer steps through
comm.engines.ddp.DDPEngine and through comm.engines.megatron.MegatronEngine. The parent compares the final parameters.
Megatron pre-scales each bucket by 1/world and sums; torch DDP divides by world and sums. x * 0.5 == x / 2
exactly, a two-rank sum a + b does not depend on where an element sits in a bucket, and micro-batches accumulate
in the same order (0 + g1 + g2 into main_grad; g1 + g2 into DDP's .grad), so the engines agree bit for bit, in
fp32 and in bf16 autocast over fp32 parameters (fp32 gradients): the assertions demand equality.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import free_port, spawn

pytest.importorskip("megatron.core")

WORLD = 2
STEPS = 3  # the first batch reduces from finish_grad_sync; later ones launch each bucket from the backward hook
SEQ, MICRO = 32, 2
SMALL_BUCKET_BYTES = 256 * 2**10  # 65,536 fp32 elements: several buckets for the ~1.4M-parameter tiny model
CASES = {  # name: (engine, grad_accum, overlap, bucket_bytes, bf16)
    "ddp": ("ddp", 1, True, 25 * 2**20, False),
    "megatron_overlap": ("megatron", 1, True, SMALL_BUCKET_BYTES, False),
    "megatron_no_overlap": ("megatron", 1, False, SMALL_BUCKET_BYTES, False),
    "megatron_default_bucket": ("megatron", 1, True, 25 * 2**20, False),
    "ddp_accum2": ("ddp", 2, True, 25 * 2**20, False),
    "megatron_accum2": ("megatron", 2, True, SMALL_BUCKET_BYTES, False),
    "ddp_bf16": ("ddp", 1, True, 25 * 2**20, True),
    "megatron_bf16": ("megatron", 1, True, SMALL_BUCKET_BYTES, True),
}


def _train(rank: int, engine_name: str, accum: int, overlap: bool, bucket_bytes: int, bf16: bool) -> dict:
    import contextlib

    from comm.engines.ddp import DDPConfig
    from comm.engines.engine import EngineInputs
    from comm.engines.megatron import MegatronConfig
    from systems.model import ModelConfig, build_model
    from systems.optim import OptimConfig, build_optimizer, build_scheduler

    torch.manual_seed(1337)
    model_cfg = ModelConfig()  # the tiny model (conf/model/tiny.yaml)
    model = build_model(model_cfg)
    optim_cfg = OptimConfig(warmup_steps=1)
    optimizer = build_optimizer(model, optim_cfg)
    inputs = EngineInputs(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, optim_cfg, STEPS),
                          grad_clip=1.0, device=torch.device("cpu"),
                          scaler=torch.amp.GradScaler("cpu", enabled=False),
                          compute_dtype="bf16" if bf16 else "fp32", bucket_bytes=bucket_bytes, overlap=overlap)
    engine = (MegatronConfig() if engine_name == "megatron" else DDPConfig()).build(inputs)

    def forward_context():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    out = {"losses": [], "grad_norms": [], "launched_in_backward": []}
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data, the same in every case
        batches = [torch.randint(0, model_cfg.vocab_size, (MICRO, SEQ + 1), generator=gen) for _ in range(accum)]
        loss = engine.forward_backward(((b[:, :-1], b[:, 1:]) for b in batches), accum, forward_context)
        if engine_name == "megatron":  # was every bucket's all-reduce already issued by megatron's backward hook?
            out["launched_in_backward"].append(all(g.grad_reduce_handle is not None
                                                   for g in engine.ddp.bucket_groups))
        stats = engine.step()
        out["losses"].append(loss.item())
        out["grad_norms"].append(stats["grad_norm"])
    out["params"] = {n: p.detach().clone() for n, p in engine.full_parameters().items()}
    out["knobs"], out["unhonoured"] = engine.knobs, engine.unhonoured
    if engine_name == "megatron":
        out["bucket_numels"] = [b.grad_data.numel() for buf in engine.ddp.buffers for b in buf.buckets]
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {name: _train(rank, *case) for name, case in CASES.items()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("megatron")
    spawn(_worker, (free_port(), str(out)), WORLD, timeout_s=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("case,reference", [
    ("megatron_overlap", "ddp"), ("megatron_no_overlap", "ddp"), ("megatron_default_bucket", "ddp"),
    ("megatron_accum2", "ddp_accum2"), ("megatron_bf16", "ddp_bf16")])
def test_megatron_reaches_the_ddp_parameters_bit_for_bit(results, case, reference):
    for rank in range(WORLD):
        got, ref = results[rank][case], results[rank][reference]
        assert _max_diff(got["params"], ref["params"]) == 0
        assert got["losses"] == ref["losses"] and got["grad_norms"] == ref["grad_norms"]
    assert _max_diff(results[0][case]["params"], results[1][case]["params"]) == 0  # replicas identical
    assert results[0][case]["losses"][0] != results[0][case]["losses"][-1]  # it trained
    assert results[0][case]["grad_norms"][0] > 1.0  # so clipping (max norm 1) acted on the reduced gradients


def test_small_buckets_are_honoured_and_overlap_launches_from_backward(results):
    r = results[0]["megatron_overlap"]
    knobs = r["knobs"]
    assert knobs["bucket_size"] == SMALL_BUCKET_BYTES // 4 == knobs["megatron_bucket_size"]
    assert knobs["overlap_grad_reduce"] and knobs["n_buckets"] == len(r["bucket_numels"]) >= 3
    # megatron closes a bucket once it holds >= bucket_size elements: every bucket but the last is that full
    assert all(n >= knobs["bucket_size"] for n in r["bucket_numels"][:-1])
    assert r["launched_in_backward"] == [False] + [True] * (STEPS - 1)  # first batch: from finish_grad_sync
    assert results[0]["megatron_accum2"]["launched_in_backward"] == [False] + [True] * (STEPS - 1)
    assert results[0]["megatron_default_bucket"]["knobs"]["n_buckets"] == 1  # 25 MiB > the whole model


def test_overlap_off_makes_one_synchronous_bucket_and_says_so(results):
    r = results[0]["megatron_no_overlap"]
    assert not r["knobs"]["overlap_grad_reduce"] and r["knobs"]["n_buckets"] == 1
    assert r["knobs"]["megatron_bucket_size"] is None and r["launched_in_backward"] == [False] * STEPS
    assert any("one bucket" in reason for reason in r["unhonoured"])


def test_cpu_bridge_is_applied_only_within_its_scope():
    from megatron.core.distributed import param_and_grad_buffer

    from comm.engines.megatron_cpu import cpu_bridges

    if torch.cuda.is_available():
        pytest.skip("the bridge is a no-op with CUDA (tested below)")
    assert param_and_grad_buffer.torch is torch
    with cpu_bridges() as bridged:
        assert bridged and param_and_grad_buffer.torch is not torch
        assert param_and_grad_buffer.torch.cuda.current_device() == "cpu"
        assert param_and_grad_buffer.torch.zeros is torch.zeros  # everything else is the real torch
        assert torch.cuda.current_device is not param_and_grad_buffer.torch.cuda.current_device  # torch untouched
    assert param_and_grad_buffer.torch is torch
    with pytest.raises(RuntimeError), cpu_bridges():
        raise RuntimeError("an error inside the scope still restores megatron's torch")
    assert param_and_grad_buffer.torch is torch


@pytest.mark.gpu  # on a GPU the bridge must patch nothing
def test_cpu_bridge_does_nothing_with_cuda():
    from megatron.core.distributed import param_and_grad_buffer

    from comm.engines.megatron_cpu import cpu_bridges

    with cpu_bridges() as bridged:
        assert not bridged and param_and_grad_buffer.torch is torch
