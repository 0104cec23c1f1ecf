"""The public data set: published throughput of data-parallel (FSDP / ZeRO / DDP) training runs, split once.

Files (data/*.csv, one row per published run, each with its source):

    llmfoundry.csv    MosaicML llm-foundry's benchmarking tables (A100-40/80, H100; bf16 and fp8)
    other_runs.csv    other published FSDP / ZeRO runs that state shapes, cluster, batch, precision, recompute

torchtitan's published performance tables are left out on purpose: they stay an independent check.

The split is fixed before any fit: a row is in the validation half when sha256("<SPLIT_SEED>:<id>") is odd.
Adding rows never moves an existing row between halves. ``calibration.fit`` sees only the calibration half and
records its row ids and the data's hash in data/fit.json; ``--validate`` refuses to run if they overlap the
validation half or the data changed since the fit.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from analysis.predictor.inputs import Cluster, ModelShape, Ranges, Techniques, apply_assumption, get_gpu, network_ranges

DATA_DIR = Path(__file__).resolve().parent / "data"
RUN_FILES = ("llmfoundry.csv", "other_runs.csv")
SPLIT_SEED = "chuanliu-predictor-v1"
COLUMNS = ["id", "model", "n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "mlp", "vocab_size", "tied_embeddings", "seq_len", "gpu", "gpus", "gpus_per_node", "nics_per_node", "nic_gbps", "engine", "precision", "recompute", "micro_batch", "grad_accum", "global_batch_seqs", "attention", "fused_loss", "tokens_per_s_per_gpu", "mfu", "hfu", "source", "notes"]
OPTIONAL = {"position": "rope", "bias": "false", "shard_group": "", "fused_kernels": ""}  # columns a file may leave out, and their values then
ATTENTION = {"flash2": "flash", "flash1": "flash", "flash": "flash", "sdpa": "flash", "triton": "triton",
             "torch": "eager", "unknown": "flash"}
LOSS = {"linear": "fused", "kernel": "kernel", "yes": "kernel", "no": "eager", "unknown": "eager"}
ENGINES = {"fsdp_full_shard": "zero3", "fsdp_hybrid_shard": "zero3", "fsdp_shard_grad_op": "zero3",
           "zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "ddp": "ddp"}


@dataclass(frozen=True, kw_only=True)
class Row:
    id: str
    model: ModelShape
    seq_len: int
    cluster: Cluster
    tech: Techniques
    micro_batch: int
    grad_accum: int
    tokens_per_s_per_gpu: float  # the published figure the predictor is judged on
    mfu: float | None
    hfu: float | None
    ranges: Ranges  # the inputs this publication does not state
    source: str
    notes: str = ""

    @property
    def validation(self) -> bool:
        return is_validation(self.id)

    @property
    def params_b(self) -> float:
        return self.model.total_params() / 1e9


def is_validation(row_id: str) -> bool:
    return int(hashlib.sha256(f"{SPLIT_SEED}:{row_id}".encode()).hexdigest(), 16) % 2 == 1


def data_sha256(files: tuple[str, ...] = RUN_FILES) -> str:
    h = hashlib.sha256()
    for name in files:
        path = DATA_DIR / name
        if path.exists():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def size_class(params_b: float) -> str:
    return "<=1.3B" if params_b <= 1.5 else ("1.3-15B" if params_b <= 15 else ">15B")


def regime(row: Row) -> str:
    """GPU type x model size x recomputation (x fp8 when the GEMMs are fp8)."""
    fp8 = " fp8" if row.tech.precision == "fp8" else ""
    return f"{row.cluster.gpu.name}{fp8} | {size_class(row.params_b)} | {row.tech.recompute}"


def _int(v: str) -> int | None:
    return int(float(v)) if v.strip() else None


def _float(v: str) -> float | None:
    return float(v) if v.strip() else None


def _techniques(r: dict) -> Techniques:
    engine = r["engine"].strip()
    if engine not in ENGINES:
        raise ValueError(f"row {r['id']}: engine {engine!r} is unknown; use one of {sorted(ENGINES)}")
    attention = r["attention"].strip() or "unknown"
    loss = r["fused_loss"].strip() or "unknown"
    if attention not in ATTENTION or loss not in LOSS:
        raise ValueError(f"row {r['id']}: attention {attention!r} / fused_loss {loss!r} unknown; use one of "
                         f"{sorted(ATTENTION)} / {sorted(LOSS)}")
    # fused kernels: torch.compile, or a framework that ships them (Megatron-core / NeMo / TransformerEngine,
    # InternEvo: fused RMSNorm, RoPE, SwiGLU and cross-entropy), as the row's fused_kernels column says
    compiled = "torch.compile" in r.get("notes", "") or r["fused_kernels"].strip() == "yes"
    gelu = r["mlp"].strip() == "gelu"
    return Techniques(
        attention=ATTENTION[attention],
        # MPT's low-precision LayerNorm and GELU are one kernel each; torch.compile fuses LLaMA's RMSNorm/SwiGLU
        fused_norm=gelu or compiled, fused_act=compiled, fused_rope=compiled,
        loss="kernel" if (compiled and LOSS[loss] == "eager") else LOSS[loss],
        recompute=r["recompute"].strip() or "none", precision=r["precision"].strip(), engine=ENGINES[engine],
        reshard_after_forward=engine != "fsdp_shard_grad_op", reduce_bytes=2, overlap=True,
        shard_group=_int(r["shard_group"]) or ((_int(r["gpus_per_node"]) or 8) if engine == "fsdp_hybrid_shard" else 0))


def _row(r: dict) -> Row:
    missing = [c for c in COLUMNS if c not in r]
    if missing:
        raise ValueError(f"data set row {r.get('id')!r} lacks columns {missing}")
    r = {k: (r.get(k) or v) for k, v in OPTIONAL.items()} | {k: v for k, v in r.items() if k not in OPTIONAL}
    model = ModelShape(name=r["model"], n_layers=int(r["n_layers"]), dim=int(r["dim"]), n_heads=int(r["n_heads"]),
                       n_kv_heads=_int(r["n_kv_heads"]), ffn_dim=int(r["ffn_dim"]), mlp=r["mlp"].strip(),
                       vocab_size=int(r["vocab_size"]), tied_embeddings=r["tied_embeddings"].strip() == "true",
                       position=r["position"].strip(), max_seq_len=int(r["seq_len"]),
                       bias=r["bias"].strip() == "true")
    gpu = get_gpu(r["gpu"].strip())
    nics, gbps = _int(r["nics_per_node"]), _float(r["nic_gbps"])
    default_nics, default_gbps = network_ranges(gpu)
    cluster = Cluster(name=r["id"], gpu=gpu, gpus=int(r["gpus"]), gpus_per_node=_int(r["gpus_per_node"]) or 8,
                      nics_per_node=nics or default_nics[0], nic_gbps=gbps or default_gbps[0])
    tech = _techniques(r)
    ranges = Ranges(nics_per_node=() if nics else default_nics, nic_gbps=() if gbps else default_gbps,
                    nccl_algo=("auto", "ring"), reduce_bytes=(2, 4),
                    notes={"network": "not published: the GPU type's common builds (inputs.DEFAULT_NETWORK)",
                           "reduce_bytes": "gradient reduction in bf16 or fp32: not published",
                           "nccl_algo": "NCCL's own choice, or ring (NCCL_ALGO=Ring)"})
    mb = _int(r["micro_batch"]) or 1
    return Row(id=r["id"], model=model, seq_len=int(r["seq_len"]),
               cluster=cluster, tech=tech, micro_batch=mb, grad_accum=_int(r["grad_accum"]) or 1,
               tokens_per_s_per_gpu=float(r["tokens_per_s_per_gpu"]), mfu=_float(r["mfu"]), hfu=_float(r["hfu"]),
               ranges=ranges, source=r["source"], notes=r.get("notes", ""))


def load_rows(files: tuple[str, ...] = RUN_FILES) -> list[Row]:
    rows: list[Row] = []
    for name in files:
        path = DATA_DIR / name
        if not path.exists():
            continue
        with path.open(newline="") as f:
            rows += [_row(r) for r in csv.DictReader(f)]
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"data set row ids must be unique; repeated: {dupes}")
    return rows


def split(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(calibration, validation) halves by the seeded hash of each row id."""
    return [r for r in rows if not r.validation], [r for r in rows if r.validation]


def with_point(row: Row) -> Row:
    """The row with its unpublished inputs at their point estimates (the first value of each range)."""
    c, t, mb, ga = apply_assumption(row.cluster, row.tech, row.micro_batch, row.grad_accum, row.ranges.point())
    return replace(row, cluster=c, tech=t, micro_batch=mb, grad_accum=ga)
