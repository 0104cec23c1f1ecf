"""Bucket size policies (comm/buckets.py) without processes: each policy yields the size it claims.

The cost model's parts are tested apart: ``predict_exposed_s`` against hand-derived cases and bounds,
``best_candidate`` against a closed form, ``measure_alpha_beta`` on a fake all-reduce that sleeps a known
alpha + beta x bytes. The real collective path runs in tests/distributed/test_bucket_policies.py.
"""
from __future__ import annotations

import logging
import math
import random
import time

import pytest
import torch
import torch.distributed as dist

from comm.buckets import (MIB, BucketChoice, BucketConfig, CostModelBuckets, GpuCountBuckets, _fit_nonnegative,
                          baichuan_reduce_bucket_elements, best_candidate, choose_bucket_bytes, measure_alpha_beta,
                          predict_exposed_s)


def _choose(cfg: BucketConfig, world_size: int = 2, element_bytes: int = 4, **kw) -> BucketChoice:
    return choose_bucket_bytes(cfg, grad_elements=1_000_000, grad_element_bytes=element_bytes,
                               world_size=world_size, **kw)


# ---------------------------------------------------------------- fixed and gpu_count

@pytest.mark.parametrize("mb", [25.0, 0.5, 1, 190.73486328125])
def test_fixed_gives_exactly_bucket_cap_mb_mebibytes(mb):
    choice = _choose(BucketConfig(bucket_cap_mb=mb))
    assert choice.bucket_bytes == mb * 2**20 and isinstance(choice.bucket_bytes, int)
    assert choice.policy == "fixed" and choice.reason.startswith(f"fixed: bucket_cap_mb={mb:g} = ")
    assert (choice.alpha_s, choice.beta_s_per_byte, choice.predicted_exposed_s) == (None, None, None)


def test_a_fixed_preset_reproduces_baichuans_reduce_bucket_size():
    bf16_mb = baichuan_reduce_bucket_elements * 2 / 2**20  # 190.73 MiB: 1e8 bf16 elements
    assert _choose(BucketConfig(bucket_cap_mb=bf16_mb)).bucket_bytes == 200_000_000
    assert _choose(BucketConfig(bucket_cap_mb=2 * bf16_mb)).bucket_bytes == 400_000_000  # fp32 gradients


@pytest.mark.parametrize("world, elements", [(1, 40_000_000), (8, 40_000_000), (40, 40_000_000),
                                             (41, 41_000_000), (64, 64_000_000), (128, 128_000_000)])
@pytest.mark.parametrize("element_bytes", [4, 2])
def test_gpu_count_follows_megatron_cores_rule(world, elements, element_bytes):
    choice = _choose(GpuCountBuckets(), world_size=world, element_bytes=element_bytes)
    assert choice.bucket_bytes == elements * element_bytes
    assert choice.policy == "gpu_count"


def test_gpu_count_reason_is_one_readable_line():
    choice = _choose(GpuCountBuckets(), world_size=4)
    assert choice.reason == "gpu_count: max(40M, 1M x 4) = 40,000,000 elements x 4 B = 152.6 MiB"
    scaled = _choose(GpuCountBuckets(min_elements=100_000, elements_per_rank=300_000))
    assert scaled.bucket_bytes == 600_000 * 4


def test_the_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="comm.buckets"):
        choice = _choose(GpuCountBuckets(), world_size=4)
    assert choice.reason in caplog.text


def test_as_dict_holds_every_field():
    d = BucketChoice(bucket_bytes=8, policy="cost_model", reason="r", alpha_s=1e-5, beta_s_per_byte=1e-9,
                     predicted_exposed_s=0.5, element_bytes=2).as_dict()
    assert d == {"bucket_bytes": 8, "policy": "cost_model", "reason": "r", "alpha_s": 1e-5,
                 "beta_s_per_byte": 1e-9, "predicted_exposed_s": 0.5, "element_bytes": 2, "elements": 4}


def test_a_choice_counts_elements_in_the_gradient_dtype_engines_reduce():
    # Megatron-core's rule in elements: bf16 gradients (DeepSpeed bf16) make a bucket of half the bytes, and the
    # engines get the same element count back (they once divided by 4 whatever the dtype: half the elements).
    cfg = GpuCountBuckets()
    for element_bytes in (4, 2):
        choice = choose_bucket_bytes(cfg, grad_elements=10**9, grad_element_bytes=element_bytes, world_size=64)
        assert choice.elements == 64_000_000 and choice.bucket_bytes == 64_000_000 * element_bytes


# ---------------------------------------------------------------- predict_exposed_s

def _exposed(bucket_bytes, grad_bytes, backward_s, alpha, beta):
    return predict_exposed_s(bucket_bytes, grad_bytes=grad_bytes, backward_s=backward_s, alpha_s=alpha,
                             beta_s_per_byte=beta)


@pytest.mark.parametrize("bucket_bytes", [1000, 1001, 10**9])
def test_one_bucket_exposes_its_whole_reduction(bucket_bytes):
    # One bucket is ready only when the backward pass ends: nothing overlaps.
    assert _exposed(bucket_bytes, 1000, 2.0, 0.003, 1e-6) == pytest.approx(0.003 + 1e-6 * 1000, rel=1e-12)


def test_many_tiny_buckets_with_latency_expose_more_as_they_multiply():
    grad, backward, alpha = 1_000_000, 1.0, 0.1
    exposed = [_exposed(grad // k, grad, backward, alpha, 0.0) for k in (1, 20, 100, 1000)]
    assert exposed == sorted(exposed) and len(set(exposed)) == 4
    # Backed up (alpha > the time between buckets, backward/k): done_k = ready_1 + k alpha.
    assert exposed[-1] == pytest.approx(backward / 1000 + 1000 * alpha - backward, rel=1e-9)


@pytest.mark.parametrize("bucket_bytes, last", [(300, 100), (250, 250), (1000, 1000), (7, 6)])
def test_bandwidth_only_faster_than_compute_exposes_the_last_bucket(bucket_bytes, last):
    # 1000 bytes produced over 1 s; the link moves 10,000 B/s, so every bucket but the last hides.
    beta = 1e-4
    assert _exposed(bucket_bytes, 1000, 1.0, 0.0, beta) == pytest.approx(beta * last, rel=1e-9)


def test_exposed_lies_between_the_last_bucket_and_all_communication():
    rng = random.Random(0)
    for _ in range(300):
        grad, bucket = rng.randint(1, 10**6), rng.randint(1, 10**6)
        backward, alpha, beta = rng.uniform(0, 2), rng.uniform(0, 1e-2), rng.uniform(0, 1e-6)
        k = math.ceil(grad / bucket)
        last = grad - (k - 1) * bucket
        got = _exposed(bucket, grad, backward, alpha, beta)
        assert got >= 0
        assert got >= (alpha + beta * last) * (1 - 1e-9)  # the last bucket starts after the backward pass
        assert got <= (k * alpha + beta * grad) * (1 + 1e-9) + 1e-15  # at worst nothing overlaps


def test_predict_refuses_empty_sizes():
    with pytest.raises(ValueError, match="must both be positive"):
        _exposed(0, 100, 1.0, 0.0, 0.0)


# ---------------------------------------------------------------- best_candidate

def _closed_form(bucket, grad, backward, alpha, beta):
    """k equal buckets: done_k = max_j (j r + (k - j + 1) c), which is at j = 1 or j = k (linear in j)."""
    k, c, r = grad // bucket, alpha + beta * bucket, backward * bucket / grad
    return max(r + k * c - backward, c)


def test_best_candidate_is_the_analytic_optimum():
    # 64 MiB of gradients over 0.1 s (671 MB/s); the link: 1 ms + 1 GB/s. Buckets keep up with the compute
    # from 2 MiB on (alpha + beta B <= 0.1 B / 64 MiB), and among those the smallest exposes least.
    cfg, grad, backward, alpha, beta = CostModelBuckets(), 64 * MIB, 0.1, 1e-3, 1e-9
    expected = {int(mb * MIB): _closed_form(int(mb * MIB), grad, backward, alpha, beta)
                for mb in cfg.candidates_mb if mb <= 64}
    for b, e in expected.items():
        assert _exposed(b, grad, backward, alpha, beta) == pytest.approx(e, rel=1e-9)
    best = min(expected, key=expected.get)
    assert best == 2 * MIB
    got = best_candidate(cfg, grad_bytes=grad, backward_s=backward, alpha_s=alpha, beta_s_per_byte=beta)
    assert got == (best, pytest.approx(expected[best], rel=1e-12))


def test_best_candidate_breaks_ties_towards_the_larger_bucket_and_caps_at_the_total():
    cfg, grad = CostModelBuckets(), 10 * MIB + 3
    # A free link: every size exposes nothing, so the largest wins, capped at the gradient size.
    free = best_candidate(cfg, grad_bytes=grad, backward_s=1.0, alpha_s=0.0, beta_s_per_byte=0.0)
    assert free == (grad, 0.0)
    # Pure latency with no compute to hide behind: one bucket (the total) beats every split.
    b, exposed = best_candidate(cfg, grad_bytes=grad, backward_s=0.0, alpha_s=1e-3, beta_s_per_byte=0.0)
    assert (b, exposed) == (grad, pytest.approx(1e-3))
    small = CostModelBuckets(candidates_mb=[0.5, 1.0])  # nothing above the total
    assert best_candidate(small, grad_bytes=grad, backward_s=0.0, alpha_s=1e-3, beta_s_per_byte=0.0)[0] == MIB


# ---------------------------------------------------------------- measuring alpha and beta

def test_measure_alpha_beta_recovers_a_fake_links_parameters():
    if dist.is_initialized() and dist.get_world_size() > 1:
        pytest.skip("needs a process without a multi-rank process group")
    alpha, beta = 4e-3, 2e-9  # 4 ms per call, 0.5 GB/s: 16 ms more at 8 MiB
    sizes = [4 * 1024, 64 * 1024, 1024 * 1024, 8192 * 1024]
    calls = []

    def sleeping_reduce(t):
        calls.append(t.numel() * t.element_size())
        time.sleep(alpha + beta * calls[-1])

    got_alpha, got_beta = measure_alpha_beta(sleeping_reduce, sizes, iters=5)
    assert calls == [n for n in sizes for _ in range(6)]  # float32 tensors of each size: one warm-up, 5 timed
    assert got_alpha == pytest.approx(alpha, rel=0.3) and got_beta == pytest.approx(beta, rel=0.3)


def test_the_probe_runs_on_the_training_device():
    if dist.is_initialized() and dist.get_world_size() > 1:
        pytest.skip("needs a process without a multi-rank process group")
    # The meta device stands in for a GPU: choose_bucket_bytes must hand the run's device down to the probe's
    # tensors, or a "cpu:gloo,cuda:nccl" run would fit gloo over TCP instead of NCCL.
    devices = []
    choice = _choose(CostModelBuckets(probe_sizes_kb=[4, 64]), backward_s=0.1,
                     reduce=lambda t: devices.append(t.device.type), device=torch.device("meta"))
    assert choice.policy == "cost_model" and devices == ["meta"] * 12  # 2 sizes x (warm-up + 5 timed)


def test_fit_is_least_squares_of_relative_error_with_nonnegative_coefficients():
    x = [1.0, 2.0, 4.0, 8.0]
    assert _fit_nonnegative(x, [3 + 2 * xi for xi in x]) == (pytest.approx(3), pytest.approx(2))
    y = [5.0, 4.0, 3.0, 2.0]  # shrinking: latency only, the 1/y^2-weighted mean
    assert _fit_nonnegative(x, y) == (pytest.approx(sum(1 / v for v in y) / sum(1 / v**2 for v in y)), 0.0)
    y = [0.5, 2.0, 4.0, 8.0]  # a negative intercept: through the origin, weighted sum(w x y) / sum(w x^2)
    alpha, beta = _fit_nonnegative(x, y)
    assert alpha == 0.0 and beta == pytest.approx(sum(a / b for a, b in zip(x, y)) / sum((a / b) ** 2 for a, b in zip(x, y)))
    # Relative weighting: 5% noise on the largest transfer does not wipe out a 1000x smaller latency point.
    x = [4e3, 1e6, 8e6, 16e6]
    clean = [20e-6 + 1e-9 * xi for xi in x]
    alpha, beta = _fit_nonnegative(x, clean[:-1] + [clean[-1] * 0.95])
    assert alpha == pytest.approx(20e-6, rel=0.2) and beta == pytest.approx(1e-9, rel=0.1)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, key", [
    ({"policy": "adaptive"}, r"comm\.bucket\.policy='adaptive' does not choose the policy .* select it with "
                             r"comm/bucket=adaptive"),
    ({"bucket_cap_mb": 0.0}, r"comm\.bucket\.bucket_cap_mb=0\.0 must be positive"),
    ({"min_elements": -1}, r"comm\.bucket\.min_elements=-1 must be positive"),
    ({"elements_per_rank": 0}, r"comm\.bucket\.elements_per_rank=0 must be positive"),
    ({"probe_iters": 0}, r"comm\.bucket\.probe_iters=0 must be positive"),
    ({"candidates_mb": []}, r"comm\.bucket\.candidates_mb=\[\] must be a non-empty list"),
    ({"candidates_mb": [1.0, -2.0]}, r"comm\.bucket\.candidates_mb=.* positive sizes"),
    ({"probe_sizes_kb": [64]}, r"comm\.bucket\.probe_sizes_kb=\[64\] needs at least two different"),
    ({"probe_sizes_kb": [64, 64]}, r"comm\.bucket\.probe_sizes_kb=\[64, 64\] needs at least two"),
    ({"probe_sizes_kb": [0, 64]}, r"comm\.bucket\.probe_sizes_kb=\[0, 64\] needs"),
])
def test_bad_config_values_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        BucketConfig(**kwargs)


def test_cost_model_refuses_what_it_cannot_measure():
    cfg = CostModelBuckets()
    with pytest.raises(ValueError, match=r"comm\.bucket\.policy=cost_model needs several processes to "
                                         r"measure; use fixed"):
        _choose(cfg, world_size=1, backward_s=0.1, reduce=lambda t: None)
    with pytest.raises(ValueError, match=r"comm\.bucket\.policy=cost_model needs the all-reduce to time"):
        _choose(cfg, world_size=2, backward_s=0.1)
    with pytest.raises(ValueError, match=r"comm\.bucket\.policy=cost_model needs the backward time"):
        _choose(cfg, world_size=2, reduce=lambda t: None)


def test_the_policy_name_follows_the_class_and_empty_models_are_refused():
    # The YAML's _target_ chooses the policy; a policy= naming another one says which option to select.
    with pytest.raises(ValueError, match=r"comm\.bucket\.policy='cost_model' does not choose the policy .*"
                                         r"comm/bucket=cost_model"):
        BucketConfig(policy="cost_model")
    assert (BucketConfig().policy, GpuCountBuckets().policy, CostModelBuckets().policy) == (
        "fixed", "gpu_count", "cost_model")
    with pytest.raises(ValueError, match="grad_elements=0"):
        choose_bucket_bytes(BucketConfig(), grad_elements=0, grad_element_bytes=4, world_size=2)
