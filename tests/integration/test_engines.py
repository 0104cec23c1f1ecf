"""Each engine through the real entry points under torchrun (2 CPU ranks): a fault drill kills rank 1 at step 5,
torchrun restarts the job, and it resumes from the step-4 checkpoint (DeepSpeed: its own format inside it) and
continues with the same losses, bit for bit, as the uninterrupted reference run. Both runs log the knobs the engine
used (the bucket and overlap policies mapped onto its own settings) and end with identical replicas."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

COMMON = ["train.steps=6", "fault/checkpoint=sync", "fault.checkpoint.every=2", "logging.wandb_mode=disabled",
          "logging.progress_bar=false", "fault.chaos.faults.0.step=5", "fault.chaos.faults.0.rank=1",
          "comm/bucket=fixed", "comm.bucket.bucket_cap_mb=1"]
MIB = 2**20


def _knobs_follow_the_policies(engine: str, env: dict) -> None:
    knobs, bucket_bytes = env["engine"], env["bucket"]["bucket_bytes"]
    assert knobs["engine"] == engine and bucket_bytes == MIB
    if engine == "deepspeed":  # ZeRO-2; DeepSpeed counts bucket sizes in elements
        assert knobs["zero_stage"] == 2 and knobs["bucket_unit"] == "elements"
        assert knobs["reduce_bucket_size"] == knobs["allgather_bucket_size"] == bucket_bytes // 4
        assert knobs["overlap_comm"] == env["overlap"]
    elif engine == "megatron":  # megatron-core counts elements too; 1 MiB buckets split the tiny model
        assert knobs["bucket_size"] == bucket_bytes // 4 and knobs["n_buckets"] > 1
        assert knobs["overlap_grad_reduce"] == env["overlap"]
    elif engine == "fsdp2":  # per-layer units, not buckets: said at start-up
        assert any("bucket" in reason for reason in env["engine_unhonoured"])


@pytest.mark.parametrize("engine", ["fsdp2", "megatron", "deepspeed"])
def test_engine_survives_a_killed_rank_bit_exact(tmp_path, engine):
    out = tmp_path / "drill"
    cmd = [sys.executable, "-m", "experiments.drill", "fault/chaos=kill_rank", f"engine={engine}", *COMMON,
           f"drill.out={out}", "drill.wandb_mode=disabled", "drill.timeout_s=200", "drill.max_restarts=1"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=260)
    assert (out / "drill_report.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "drill_report.json").read_text())
    launcher = (out / "faulty" / "launcher.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + launcher[-4000:]
    assert report["restarts"] == 1 and report["faults"][0]["resumed_from_step"] == 4
    assert report["loss"]["bit_exact"], (report["loss"], launcher[-3000:])
    for run in ("reference", "faulty"):
        summary = json.loads((out / run / "summary.json").read_text())
        _knobs_follow_the_policies(engine, summary["environment"])
        assert summary["replicas"]["identical"]
    if engine == "deepspeed":  # DeepSpeed's own per-rank optimizer shards, verified and committed with the rest
        state = out / "faulty" / "checkpoints" / "step_000006" / "deepspeed" / "state"
        assert (state / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
