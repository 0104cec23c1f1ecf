"""Checkpoints that cannot be turned against the job that loads them (fault.safe_load, fault.checkpoint).

Each test plays an attacker who can write the checkpoint directory: it takes a real checkpoint written by
CheckpointManager, tampers with the newest one (with DCP's own writer where a pickle goes in, and re-seals the
manifest, as such an attacker can), and loads through the manager. Every test asserts that no code ran (a marker
file is absent), nothing outside the checkpoint was opened, the tampered checkpoint was refused in one line, and
the live model holds exactly the previous good checkpoint's weights (or, with no fallback, its own).
"""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fault import safe_load
from fault.checkpoint import (
    MANIFEST,
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    file_sha256,
    newest_committed,
    verify_checkpoint,
)
from fault.events import EventLog, read_events

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FP = {"model": {"dim": 8}}


class RunsCode:
    """Unpickling it runs a command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def build(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def state(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def manager(run: Path, **cfg) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(mode="sync", **cfg), run_dir=run, rank=0, world_size=1,
                             fingerprint=FP, events=EventLog(run, 0))


@pytest.fixture
def run(tmp_path) -> dict:
    """Two committed checkpoints (steps 1 and 2) with different weights; the weights each holds."""
    model, opt = build(0)
    mgr = manager(tmp_path)
    weights = {}
    for step in (1, 2):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.save(step, sharded=state(model, opt), per_rank={"step": step})
    mgr.close()
    ckpts = tmp_path / "checkpoints"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"S" * 4096)
    return {"dir": tmp_path, "ckpts": ckpts, "newest": ckpts / "step_000002", "weights": weights,
            "marker": tmp_path / "pwned", "outside": outside}


@pytest.fixture
def opened(monkeypatch, run):
    """Every path opened (builtins/io.open, os.open) that lies in the attacker's ``outside`` directory."""
    seen: list[str] = []
    outside = str(run["outside"].resolve())

    def track(path):
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return
        if p.startswith(outside):
            seen.append(p)

    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (track(f), real_open(f, *a, **k))[1])
    monkeypatch.setattr(io, "open", lambda f, *a, **k: (track(f), real_io_open(f, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda f, *a, **k: (track(f), real_os_open(f, *a, **k))[1])
    return seen


def reseal(ckpt: Path, drop: tuple[str, ...] = (), extra: dict | None = None) -> None:
    """Rewrite the manifest to match the files on disk, as whoever tampers with a checkpoint can."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = {}
    for p in sorted(ckpt.rglob("*")):
        name = str(p.relative_to(ckpt))
        if p.is_file() and not p.is_symlink() and name != MANIFEST and name not in drop:
            files[name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    manifest["files"] = {**files, **(extra or {})}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def rewrite_dcp(ckpt: Path, change) -> None:
    """Rewrite the checkpoint's DCP part with DCP's own writer after ``change(state)`` (plain DCP pickles whatever
    non-tensor value it is given into a bytes item)."""
    model, opt = build(0)
    sd = state(model, opt)
    dcp.load(sd, checkpoint_id=ckpt, no_dist=True, planner=safe_load.SafePlanner())  # the real values first
    for p in ckpt.glob("*.distcp"):
        p.unlink()
    change(sd)
    dcp.save(sd, checkpoint_id=ckpt, no_dist=True)


def edit_metadata(ckpt: Path, change) -> None:
    """Unpickle .metadata (test code trusts it), change its storage entries, pickle it back."""
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    change(md)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def load_fresh(run: dict, **cfg):
    """Load as a restarted job does, into a model that starts from other weights; returns (loaded, model)."""
    model, opt = build(123)
    sd = state(model, opt)
    loaded = manager(run["dir"], **cfg).load(sd)
    if loaded is not None:
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return loaded, model


def assert_refused_and_fell_back(run: dict, opened: list, reason: str) -> None:
    opened.clear()  # what the attacker's set-up wrote there is not the load's doing
    loaded, model = load_fresh(run)
    assert not run["marker"].exists(), "code in the checkpoint ran"
    assert opened == [], f"read outside the checkpoint: {opened}"
    assert loaded is not None and loaded.step == 1, "the previous good checkpoint is used"
    for k, v in model.state_dict().items():
        assert torch.equal(v, run["weights"][1][k]), f"{k} is not step 1's"
    [event] = [e for e in read_events(run["dir"]) if e["kind"] == "checkpoint_fallback"]
    assert event["skipped"] == str(run["newest"]) and event["used"].endswith("step_000001")
    assert reason in event["reason"] and "\n" not in event["reason"], event["reason"]
    assert not run["newest"].exists() and len(list(run["ckpts"].glob("step_000002.corrupt-*"))) == 1
    again, _ = load_fresh(run)  # a restart: the refused checkpoint is not picked again (no restart loop)
    assert again.step == 1


def first_bytes_item(ckpt: Path) -> str:
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    return next(k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata")


# ---- code execution -------------------------------------------------------------------------------------------
def test_a_pickle_in_an_optimizer_hyperparameter_does_not_run(run, opened):
    def poison(sd):
        sd["optim"]["param_groups"][0]["lr"] = RunsCode(run["marker"])
    rewrite_dcp(run["newest"], poison)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "optim.param_groups")


@pytest.mark.parametrize("where", ["optim.param_groups.0.betas", "optim.param_groups.0.weight_decay"])
def test_other_bytes_items_are_guarded_too(run, opened, where):
    def poison(sd):
        sd["optim"]["param_groups"][0][where.rsplit(".", 1)[1]] = RunsCode(run["marker"])
    rewrite_dcp(run["newest"], poison)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, where)


def test_a_weight_redeclared_as_a_pickle_does_not_run(run, opened):
    def poison(sd):
        sd["model"]["0.weight"] = RunsCode(run["marker"])
    rewrite_dcp(run["newest"], poison)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "model.0.weight")


def test_a_weight_redeclared_as_a_plain_value_is_refused_before_any_tensor_is_copied(run, opened):
    def poison(sd):
        sd["model"]["0.weight"] = 5  # loads with weights_only, but would replace a tensor by an int
    rewrite_dcp(run["newest"], poison)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "declares 'model.0.weight' as a pickled object")


def test_metadata_that_would_run_code_is_refused(run, opened):
    (run["newest"] / ".metadata").write_bytes(pickle.dumps(RunsCode(run["marker"])))
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "posix.system")


def test_a_rank_file_that_would_run_code_is_refused(run, opened):
    torch.save({"step": 2, "payload": RunsCode(run["marker"])}, run["newest"] / "rank00000.pt")
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "rank00000.pt")


# ---- reads outside the checkpoint ------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["absolute", "dotdot", "nested_dotdot"])
def test_metadata_storage_paths_outside_the_checkpoint_are_refused(run, opened, style):
    secret = run["outside"] / "secret"
    target = {"absolute": str(secret), "dotdot": "../../outside/secret",
              "nested_dotdot": "sub/../../../outside/secret"}[style]

    def redirect(md):
        for info in md.storage_data.values():
            info.relative_path, info.offset = target, 0
    edit_metadata(run["newest"], redirect)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "leaves the checkpoint directory")


def test_metadata_storage_in_an_unlisted_file_is_refused(run, opened):
    def redirect(md):
        for info in md.storage_data.values():
            info.relative_path = "elsewhere.distcp"
    edit_metadata(run["newest"], redirect)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "not a listed file")


@pytest.mark.parametrize("name", ["../../outside/secret", "/etc/hostname", "./rank00000.pt", "a//b"])
def test_manifest_names_outside_or_not_normalised_are_refused_unread(run, opened, name):
    reseal(run["newest"], extra={name: {"bytes": 4096, "sha256": "0" * 64}})
    assert_refused_and_fell_back(run, opened, "not normalised")


def test_a_rank_file_symlinked_outside_is_refused(run, opened):
    rank_file = run["newest"] / "rank00000.pt"
    (run["outside"] / "rank.pt").write_bytes(rank_file.read_bytes())
    rank_file.unlink()
    rank_file.symlink_to(run["outside"] / "rank.pt")
    reseal(run["newest"], extra={"rank00000.pt": {"bytes": 1, "sha256": "0" * 64}})
    assert_refused_and_fell_back(run, opened, "symlink")


def test_a_hard_link_to_a_file_elsewhere_is_refused(run, opened):
    shard = next(run["newest"].glob("*.distcp"))
    copy = run["outside"] / "shard"
    copy.write_bytes(shard.read_bytes())
    shard.unlink()
    os.link(copy, shard)
    reseal(run["newest"])
    assert_refused_and_fell_back(run, opened, "hard link")


def test_a_symlinked_subdirectory_is_refused(run, opened):
    (run["newest"] / "sub").symlink_to(run["outside"])
    reseal(run["newest"], extra={"sub/secret": {"bytes": 4096, "sha256": file_sha256(run["outside"] / "secret")}})
    assert_refused_and_fell_back(run, opened, "symlink")


def test_a_symlinked_checkpoint_directory_is_refused(run, opened):
    real = run["outside"] / "step_real"
    run["newest"].rename(real)
    run["newest"].symlink_to(real)
    assert_refused_and_fell_back(run, opened, "symlink")


# ---- complete verification ---------------------------------------------------------------------------------------
def test_a_shard_left_out_of_the_manifest_is_refused_even_when_bit_flipped(run, opened):
    shard = next(run["newest"].glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reseal(run["newest"], drop=(shard.name,))
    assert_refused_and_fell_back(run, opened, "not listed")


def test_an_extra_file_is_refused(run, opened):
    (run["newest"] / "notes.txt").write_text("hello")
    assert_refused_and_fell_back(run, opened, "notes.txt is not listed")


# ---- verify before touching the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["rank_file", "bytes_item"])
def test_a_refused_checkpoint_named_alone_leaves_the_live_model_untouched(run, attack):
    if attack == "rank_file":
        torch.save({"payload": RunsCode(run["marker"])}, run["newest"] / "rank00000.pt")
    else:
        rewrite_dcp(run["newest"], lambda sd: sd["optim"]["param_groups"][0].update(lr=RunsCode(run["marker"])))
    reseal(run["newest"])
    model, opt = build(123)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="step_000002 is refused"):
        manager(run["dir"], resume=str(run["newest"])).load(lambda: state(model, opt))
    assert not run["marker"].exists()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert run["newest"].exists()  # named by the user: refused, not renamed


def test_every_checkpoint_set_aside_stops_instead_of_starting_fresh(run):
    for ckpt in newest_committed(run["ckpts"]):
        (ckpt / "rank00000.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="all 2 committed checkpoints .* are corrupt or refused"):
        load_fresh(run)
    with pytest.raises(CheckpointError, match="every checkpoint in .* was set aside"):
        load_fresh(run)  # the restart after it: still no silent fresh start


# ---- model-only readers ------------------------------------------------------------------------------------------
def test_model_only_reads_refuse_a_weight_stored_as_a_pickle(run):
    rewrite_dcp(run["newest"], lambda sd: sd["model"].update({"0.weight": RunsCode(run["marker"])}))
    reseal(run["newest"])
    with pytest.raises(safe_load.Refused, match="model.0.weight"):
        verify_checkpoint(run["newest"])
    model, _ = build(5)
    msd = {"model": dict(model.state_dict())}
    with pytest.raises(BaseException, match="model.0.weight"):  # DCP wraps it in a CheckpointException
        safe_load.load(msd, run["newest"], no_dist=True)
    assert not run["marker"].exists()


def test_the_good_checkpoint_passes_every_check(run):
    manifest = verify_checkpoint(run["newest"])
    assert set(manifest["files"]) == set(safe_load.scan(run["newest"])) - {MANIFEST}
    assert first_bytes_item(run["newest"]).startswith("optim.")


@pytest.mark.parametrize("field,value,reason", [("dp_of_rank", ["x"], "ValueError"),
                                                ("world_size", "many", "TypeError"),
                                                ("files", [], "not listed")])
def test_a_manifest_with_nonsense_fields_is_refused_not_a_crash(run, opened, field, value, reason):
    manifest = json.loads((run["newest"] / MANIFEST).read_text())
    manifest[field] = value
    (run["newest"] / MANIFEST).write_text(json.dumps(manifest))
    assert_refused_and_fell_back(run, opened, reason)
