"""comm/schedules.py, the one schedule table: torch's schedules (what the trainer runs) map onto the predictor's, the
forms give the papers' numbers, and the in-flight forms agree with torch's own action lists."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from analysis.predictor import pipeline as predictor_pipeline
from analysis.predictor.cli import main
from analysis.predictor.configs import REPO, layout_flags, layout_from_config
from comm.parallel import bubble
from comm.parallel import pipeline as runner
from comm.schedules import SCHEDULES, TORCH_SCHEDULES, from_torch


def test_every_schedule_the_trainer_runs_maps_to_one_predictor_schedule():
    accepted = runner.schedule_names()  # what check_layout / build_schedule take (parallel.pp_schedule)
    assert set(accepted) == set(TORCH_SCHEDULES)  # this torch runs every schedule the table describes
    mapped = [from_torch(name.lower()).name for name in accepted]  # case-insensitive, as torch
    assert len(set(mapped)) == len(accepted)  # one predictor schedule each, none shared
    for name, paper in zip(accepted, mapped):
        assert predictor_pipeline.SCHEDULES[paper] is runner.schedule_traits(name)  # the same object, not a copy
        assert SCHEDULES[paper].torch_name == name
    assert runner.SPLIT_BACKWARD == {"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"}
    with pytest.raises(ValueError, match="GPipe, 1F1B"):
        from_torch("PipeDream")


def test_bubbles_are_the_papers_numbers():
    """Of the ideal step: Narayanan et al. 2021 (p-1)/m, /v interleaved; Qi et al. 2024 ZB-H1 (p-1)/3m, ZB-H2 and
    ZB-V 0 at T_F = T_B = T_W; DualPipe (DeepSeek-V3) (p-1)/3m. Of the step: (p-1)/(m+p-1) and its kin."""
    p, m = 8, 64
    s = SCHEDULES
    assert s["gpipe"].bubble_fraction(p, m) == s["1f1b"].bubble_fraction(p, m) == pytest.approx(7 / 64)
    assert s["interleaved"].bubble_fraction(p, m, v=2) == s["looped_bfs"].bubble_fraction(p, m, v=2) \
        == pytest.approx(7 / 128)
    assert s["zb_h1"].bubble_fraction(p, m) == pytest.approx(7 / (3 * 64))
    assert s["zb_h2"].bubble_fraction(p, m) == s["zb_v"].bubble_fraction(p, m, v=2) == 0.0
    assert s["dualpipe_v"].bubble_fraction(p, m, v=2) == pytest.approx(7 / (3 * 64))
    assert s["interleaved"].bubble_fraction(p, m, v=4) == pytest.approx(s["1f1b"].bubble_fraction(p, m) / 4)
    # away from equal times: ZB-H1 leaves (p-1)(T_F + T_B - T_W), ZB-H2 (p-1)(T_F + T_B - 2 T_W)
    assert s["zb_h1"].bubble_s(p, 1, 1.0, 2.0, 0.5) == pytest.approx(7 * 2.5)
    assert s["zb_h2"].bubble_s(p, 1, 1.0, 2.0, 0.5) == pytest.approx(7 * 2.0)
    assert s["1f1b"].bubble_s(1, 1, 1.0, 2.0, 0.5) == 0.0  # no pipeline, no bubble
    assert s["gpipe"].step_bubble(4, 8) == pytest.approx(3 / 11)
    assert s["interleaved"].step_bubble(4, 8, 2) == pytest.approx(3 / 19)
    assert s["zb_h1"].step_bubble(4, 8, 2) == pytest.approx(3 / 51)
    assert s["dualpipe_v"].step_bubble(4, 8, 2) == pytest.approx(3 / 27)


def test_in_flight_is_the_papers_and_torchs():
    """Stage 1 holds m (GPipe), p (1F1B, ZB-H1, ZB-V), 2p-1 (ZB-H2), p(1 + (p-1)/(pv)) (interleaved, Korthikanti
    et al. 2022); torch's action lists give the same at m >= 2p, and p + 1/2 for DualPipeV, m for LoopedBFS."""
    s = SCHEDULES
    assert (s["gpipe"].in_flight(8, 64), s["1f1b"].in_flight(8, 64), s["zb_h1"].in_flight(8, 64)) == (64, 8, 8)
    assert (s["zb_h2"].in_flight(8, 64), s["zb_v"].in_flight(8, 64, 2)) == (15, 8)
    assert s["interleaved"].in_flight(8, 64, 2) == pytest.approx(8 * (1 + 7 / 16))
    assert s["1f1b"].in_flight(8, 4) == 4  # fewer micro-batches than stages
    for name, sched in TORCH_SCHEDULES.items():
        for v in ((2,) if sched.chunks == "two" else (1, 2) if sched.chunks == "any" else (1,)):
            for p, m in ((2, 4), (4, 8), (4, 16)):
                assert bubble.peak_in_flight(name, p, m, v) == pytest.approx(sched.in_flight(p, m, v)), (name, v, p, m)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "layout").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_runs_layout_maps_without_retyping_the_schedule(path, capsys):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    mapped = layout_from_config(cfg)
    par = cfg["parallel"]
    if par.get("tp", 1) == 1 and par.get("pp", 1) == 1:
        assert mapped is None
        return
    layout, m = mapped
    assert (layout.tp, layout.pp) == (par.get("tp", 1), par.get("pp", 1))
    if layout.pp > 1:
        assert SCHEDULES[layout.schedule].torch_name == par["pp_schedule"]
        assert layout.chunks == par.get("pp_virtual_stages", 1)
        accum = cfg.get("train", {}).get("grad_accum_steps", 1)
        assert m == max(accum, layout.pp * layout.chunks)  # the trainer's rule (ParallelConfig.microbatches)
    flags = layout_flags(layout, m)  # the command the run's note prints runs as it is
    main(["--techniques", "megatron", *flags.split()])
    assert f"{layout.label()}" in capsys.readouterr().out


def test_the_table_imports_without_torch():
    """analysis/ reads it as a pure formula: importing it must not start torch."""
    code = "import sys, comm.schedules; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
