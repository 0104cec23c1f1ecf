"""DeepSpeed checkpoints resumed without DeepSpeed's full unpickler (comm/engines/deepspeed.py: native_check,
native_load with trust_pickle=False).

Two gloo processes train the tiny model a few steps with each ZeRO stage in fp32 and bf16 and native_save; a fresh
engine then native_loads it through the weights_only reader: parameters, Adam's first moment and the step count
must come back bit for bit. Then DeepSpeed's model-state file is rewritten with an object whose unpickling creates a
marker file: native_check refuses it, native_load refuses it, and so does native_load with native_check skipped (the
weights_only reads alone); the marker never appears, though a full torch.load of the same file does create it.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_deepspeed_engine import _init, _inputs, _train
from tests.helpers import free_port, spawn

pytest.importorskip("deepspeed")
WORLD = 2
CASES = [(stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16")]
TAMPERED = (2, "bf16")  # the default engine (conf/engine/deepspeed.yaml) with the Baichuan preset's precision


class _Payload:
    """Unpickling this creates ``marker``: what a tampered checkpoint would do with a less harmless call."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "a")


def _state(ds) -> dict:
    inner = getattr(ds.optimizer, "optimizer", ds.optimizer)  # ZeRO wraps the torch AdamW; plain ZeRO-0 does not
    return {"params": {k: v.float() for k, v in ds.full_parameters().items()},
            "exp_avg": [s["exp_avg"].float().clone() for s in inner.state.values()],
            "steps": ds.engine.global_steps, "lr": ds.optimizer.param_groups[0]["lr"]}


def _refusal(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "not refused"


def _worker(rank: int, port: int, out: str) -> None:
    from comm.engines.deepspeed import DeepSpeedConfig

    _init(rank, port)
    result = {}
    for stage, dtype in CASES:
        ckpt = Path(out) / f"z{stage}_{dtype}"
        trained = DeepSpeedConfig(zero_stage=stage).build(_inputs(dtype))
        _train(trained, rank, dtype)
        trained.native_save(ckpt)
        fresh = DeepSpeedConfig(zero_stage=stage).build(_inputs(dtype))
        before = _state(fresh)
        fresh.native_check(ckpt)
        fresh.native_load(ckpt, trust_pickle=False)
        result[(stage, dtype)] = {"saved": _state(trained), "before": before, "loaded": _state(fresh)}

    ckpt = Path(out) / "z{}_{}".format(*TAMPERED)
    victim = ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt"  # read by every rank: no one waits
    dist.barrier()
    if rank == 0:
        sd = torch.load(victim, weights_only=False)  # our own file, just written
        torch.save({**sd, "payload": _Payload(f"{out}/marker")}, victim)
    dist.barrier()
    engine = DeepSpeedConfig(zero_stage=TAMPERED[0]).build(_inputs(TAMPERED[1]))
    result["check"] = _refusal(lambda: engine.native_check(ckpt))
    result["load"] = _refusal(lambda: engine.native_load(ckpt))
    engine.native_check = lambda path: None  # the weights_only reads alone must refuse it too
    result["load_unchecked"] = _refusal(lambda: engine.native_load(ckpt))
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_native_checkpoints_load_weights_only_and_tampering_is_refused(tmp_path):
    spawn(_worker, (free_port(), str(tmp_path)), WORLD, timeout_s=180)
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case in CASES:
            saved, before, loaded = r[case]["saved"], r[case]["before"], r[case]["loaded"]
            assert any(not torch.equal(before["params"][k], v) for k, v in saved["params"].items()), case
            for name, value in saved["params"].items():
                assert torch.equal(loaded["params"][name], value), (rank, case, name)
            assert saved["exp_avg"] and len(loaded["exp_avg"]) == len(saved["exp_avg"]), (rank, case)
            assert any(m.abs().sum() > 0 for m in saved["exp_avg"]), (rank, case)  # the moment trained
            for got, want in zip(loaded["exp_avg"], saved["exp_avg"], strict=True):
                assert torch.equal(got, want), (rank, case)
            assert (loaded["steps"], loaded["lr"]) == (saved["steps"], saved["lr"]), (rank, case)

        assert "mp_rank_00_model_states.pt" in r["check"], r["check"]
        assert "open" in r["check"] and "unpickle arbitrary objects" in r["check"], r["check"]
        for msg in (r["check"], r["load"], r["load_unchecked"]):
            assert "fault.checkpoint.trust_pickle=true" in msg, msg
        assert "mp_rank_00_model_states.pt" in r["load_unchecked"] and "weights_only" in r["load_unchecked"]
    assert not (tmp_path / "marker").exists()
    # The payload is live: DeepSpeed's own reader (weights_only=False) would have run it.
    victim = tmp_path / "z{}_{}".format(*TAMPERED) / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    torch.load(victim, weights_only=False)
    assert (tmp_path / "marker").exists()


def test_links_and_special_files_are_refused(tmp_path):
    from comm.engines.deepspeed import check_native_files

    state = tmp_path / "deepspeed" / "state"
    state.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, tmp_path / "elsewhere.pt")
    check_native_files(tmp_path)  # an empty tag directory passes
    (state / "mp_rank_00_model_states.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt: it is a symlink or not a regular file"):
        check_native_files(tmp_path)
    (state / "mp_rank_00_model_states.pt").unlink()
    os.mkfifo(state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="optim_states.pt: it is a symlink or not a regular file"):
        check_native_files(tmp_path)
