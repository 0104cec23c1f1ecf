"""Cluster-scale predictor: what a configuration reaches on a GPU cluster, held against published runs.

Start at ``predict`` (step.py): a model shape, a cluster and technique choices go in, a ``Prediction`` comes out
(step time, tokens/s/GPU, TFLOPS and MFU under the palm convention, HFU, memory, goodput). The sections:

    inputs.py        model shapes, GPU types, clusters, techniques, ranges of unpublished inputs
    compute.py       GEMMs with tile/wave quantisation, FlashAttention by sequence and head dim, memory-bound
                     kernels, the loss, per-layer overhead, the optimizer
    collectives.py   NCCL rings over rails, trees, NVLink; chuanliu's hierarchical all-reduce
    step.py          engines (DDP, ZeRO-1/2/3, FSDP) put compute and communication together
    parallel.py      tensor x pipeline x data parallel layouts (Megatron-LM): ``predict_layout`` and ``Layout``
    tensor.py        tensor- and sequence-parallel collectives per layer, on NVLink or across nodes
    pipeline.py      pipeline schedules (GPipe, 1F1B, interleaved, zero-bubble): bubbles, in-flight micro-batches,
                     the sends between stages
    search.py        the layouts that fit a cluster's memory, ranked by predicted tokens/s
    memory.py        activations (Korthikanti, with tp/sp and the schedule's in-flight micro-batches) and
                     ZeRO-sharded states
    goodput.py       Young/Daly checkpoint intervals and useful time
    interval.py      unpublished inputs as ranges: an interval with its point estimate
    dataset.py       the public data set (data/*.csv) and its seeded split
    calibration.py   the fit on the calibration half (data/fit.json), validation, a CPU's own calibration
    configs.py       a chuanliu run's typed configs -> the predictor's inputs
    nccl_check.py    the collective model against published nccl-tests bus bandwidths
    titan_check.py   the independent check: torchtitan's published tables, never in the data set
    megatron_check.py tp x pp x dp against Megatron-LM's weak-scaling table (Narayanan et al. 2021), never fitted
    cli.py           python -m analysis.predictor (docs/predictor.md)
"""
from analysis.predictor.collectives import busbw_gbps, collective_s
from analysis.predictor.compute import Efficiencies
from analysis.predictor.configs import (
                                        cpu_cluster,
                                        load_model,
                                        model_from_config,
                                        techniques_from_config,
                                        techniques_from_configs,
)
from analysis.predictor.inputs import (
                                        BAICHUAN_7B_RANGES,
                                        CLUSTERS,
                                        GPUS,
                                        TECHNIQUES,
                                        Cluster,
                                        ModelShape,
                                        Ranges,
                                        Techniques,
                                        get_cluster,
                                        get_gpu,
                                        get_techniques,
)
from analysis.predictor.interval import Interval, predict_interval
from analysis.predictor.parallel import Layout, predict_layout
from analysis.predictor.search import search_layouts
from analysis.predictor.step import Prediction, predict

__all__ = ["BAICHUAN_7B_RANGES", "CLUSTERS", "GPUS", "TECHNIQUES", "Cluster", "Efficiencies", "Interval", "Layout",
           "ModelShape", "Prediction", "Ranges", "Techniques", "busbw_gbps", "collective_s", "cpu_cluster",
           "get_cluster", "get_gpu", "get_techniques", "load_model", "model_from_config", "predict",
           "predict_interval", "predict_layout", "search_layouts", "techniques_from_config",
           "techniques_from_configs"]
