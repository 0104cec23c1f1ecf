"""DeepSpeed ZeRO 0-3 on two gloo processes against the DDP engine: same seed, same data, same parameters.

Tolerances (tiny model, 3 steps of AdamW at lr 3e-3, 2 micro-batches each, grad clip 1.0):
- fp32: atol 1e-5 (measured <= 7e-6 for every stage): the reduction order differs (DDP sums buckets of
  pre-divided gradients, ZeRO reduces partitions), a relative ~1e-7 in the gradients. The embedding gets 2e-4
  (measured 9e-6 ZeRO-0, 1e-5 ZeRO-1, 3e-5 ZeRO-2, 1.1e-4 ZeRO-3): its rows seen by one or two tokens have small
  gradients that Adam normalises (g / sqrt(v)), so their rounding differences reach the update at lr scale.
- bf16: DeepSpeed keeps bf16 weights with fp32 masters, DDP fp32 weights under autocast, so they differ by bf16
  rounding of the weights: atol 1e-2 (measured 4.9e-3; one bf16 ulp of weights near 1 is 2**-8 ~ 4e-3).
"""
import contextlib
import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import REPO, free_port, spawn

pytest.importorskip("deepspeed")
WORLD = 2
STEPS, N_MICRO, BATCH, SEQ = 3, 2, 2, 32
FP32_ATOL, FP32_EMBED_ATOL, BF16_ATOL = 1e-5, 2e-4, 1e-2


def _init(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def _inputs(dtype: str, **kw):
    from comm.engines.engine import EngineInputs
    from systems.model import ModelConfig, build_model
    from systems.optim import OptimConfig, build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model(ModelConfig())
    optim_cfg = OptimConfig()
    opt = build_optimizer(model, optim_cfg)
    return EngineInputs(model=model, optimizer=opt, scheduler=build_scheduler(opt, optim_cfg, STEPS),
                        grad_clip=optim_cfg.grad_clip, device=torch.device("cpu"),
                        scaler=torch.amp.GradScaler("cpu", enabled=False), compute_dtype=dtype,
                        bucket_bytes=2**20, **kw)


def _train(engine, rank: int, dtype: str) -> None:
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, the same for every engine
    for _ in range(STEPS):
        batches = [torch.randint(0, 4096, (BATCH, SEQ + 1), generator=gen) for _ in range(N_MICRO)]
        engine.forward_backward(((b[:, :-1], b[:, 1:]) for b in batches), N_MICRO, ctx)
        engine.step()


def _parity_worker(rank: int, port: int, out: str, cases: list) -> None:
    from comm.engines.ddp import DDPConfig
    from comm.engines.deepspeed import DeepSpeedConfig

    _init(rank, port)
    for dtype in sorted({d for _, d in cases}):
        ref = DDPConfig().build(_inputs(dtype))
        _train(ref, rank, dtype)
        result = {"ddp": ref.full_parameters()}
        for stage, d in cases:
            if d != dtype:
                continue
            engine = DeepSpeedConfig(zero_stage=stage).build(_inputs(dtype, overlap=True))
            _train(engine, rank, dtype)
            result[stage] = {k: v.float() for k, v in engine.full_parameters().items()}
            result[f"knobs{stage}"] = engine.knobs
        torch.save(result, f"{out}/{dtype}_rank{rank}.pt")
    dist.destroy_process_group()


def test_zero_stages_match_ddp(tmp_path):
    cases = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]
    spawn(_parity_worker, (free_port(), str(tmp_path), cases), WORLD, timeout_s=240)
    for dtype, tol in (("fp32", FP32_ATOL), ("bf16", BF16_ATOL)):
        r0, r1 = (torch.load(tmp_path / f"{dtype}_rank{r}.pt") for r in range(WORLD))
        initial = _inputs("fp32").model.state_dict()
        for stage in (s for s, d in cases if d == dtype):
            knobs = r0[f"knobs{stage}"]
            assert knobs["zero_stage"] == stage and knobs["reduce_bucket_size"] == 2**20 // 4
            assert knobs["overlap_comm"] is True and knobs["bf16"] == (dtype == "bf16")
            for name, ref in r0["ddp"].items():
                got = r0[stage][name]
                assert torch.equal(got, r1[stage][name]), (stage, name)  # replicas identical
                assert not torch.equal(got, initial[name]), (stage, name)  # it trained
                atol = FP32_EMBED_ATOL if dtype == "fp32" and "embed" in name else tol
                err = (got - ref).abs().max().item()
                assert err <= atol, f"{dtype} ZeRO-{stage} {name}: max |ds - ddp| = {err:.2e} > {atol}"


def test_fp16_is_refused_with_the_way_out():
    from comm.engines.deepspeed import DeepSpeedConfig

    with pytest.raises(ValueError, match="DeepSpeed refuses fp16 on CPU.*precision=bf16"):
        DeepSpeedConfig().ds_config(_inputs("fp16"))


def test_baichuan_preset_hands_deepspeed_the_published_json():
    from omegaconf import OmegaConf

    from comm.engines.deepspeed import DeepSpeedConfig, deep_merge
    from experiments.config import typed

    cfg = typed(OmegaConf.load(REPO / "conf/engine/deepspeed_baichuan.yaml"), "engine")
    published = json.loads((REPO / "conf/engine/baichuan_7b_deepspeed.json").read_text())
    ds, knobs, unhonoured = cfg.ds_config(_inputs("bf16", comm_hook=("hook", "state")))
    assert deep_merge(published, cfg.json_overrides) == ds
    assert {k: v for k, v in ds.items() if k != "tensorboard"} == {k: v for k, v in published.items()
                                                                   if k != "tensorboard"}
    assert cfg.json_overrides == {"tensorboard": {"enabled": False}}
    assert ds["tensorboard"] == {**published["tensorboard"], "enabled": False} and type(ds["tensorboard"]) is dict
    assert knobs["zero_stage"] == 2 and knobs["reduce_bucket_size"] == 1e8 and knobs["overlap_comm"] is True
    assert knobs["bf16"] is True and knobs["gradient_clipping"] == 1.0
    assert any("comm hook" in u for u in unhonoured) and any("optimizer section" in u for u in unhonoured)
    with pytest.raises(ValueError, match="precision=bf16"):
        cfg.ds_config(_inputs("fp16"))
