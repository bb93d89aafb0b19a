"""Per-rank memory estimate for a training layout: pure arithmetic over numbers (no torch import).

`estimate(dims, setup)` returns one `RankMemory` per pipeline stage (ranks within a stage are alike) and
names the worst. Semantics follow the two backends (`explain()` prints the formulas with the numbers):

- deepspeed (classic ZeRO accounting, Rajbhandari et al. 2020): mixed precision keeps 2-byte params and
  grads, a 4-byte fp32 master copy and 8 bytes of Adam state per trainable param: per rank stage0 16Ψ,
  stage1 4Ψ+12Ψ/Nd, stage2 2Ψ+14Ψ/Nd, stage3 16Ψ/Nd. fp32: params 4, grads 4, no master.
- native (FSDP2 + autocast): fp32 params ARE the master weights (no copy); grads fp32; stage1 shards Adam;
  stage2/3 shard everything (16Ψ/Nd) but keep unsharded compute-dtype params gathered: all layers (stage2,
  reshard_after_forward=False) or the root + two blocks in flight (stage3).
Ψ counts only trainable params for grads/optimizer/master: a PEFT base is frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from trellis.configs.validate import offload_errors, resolve_quantization
from trellis.errors import ConfigError
from trellis.parallel.dims import model_split_errors
from trellis.parallel.pipeline import SCHEDULES

from .activations import cp_alltoall_bytes, cp_replicated_kv_bytes, model_level_bytes, per_layer_bytes, regime
from .models import Linear, ModelDims, layer_linears, param_counts, total_params

KEYS = ("params", "grads", "optimizer_states", "master_weights", "activations", "logits", "buffers", "comm_buffers",
        "allocator", "total",
        "cpu_offload", "nvme_offload")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PEFT_METHODS = ("none", "lora", "rslora", "dora", "qlora", "ia3")
# bytes per base-linear weight when quantized: data + quantization constants (bitsandbytes layout)
QUANT_BYTES = {
    ("nf4", False): 0.5 + 4 / 64,  # 4-bit codes + fp32 absmax per 64-block
    ("nf4", True): 0.5 + 1 / 64 + 4 / (64 * 256),  # double quant: 8-bit absmax per 64 + fp32 per 256 of those
    ("int8", False): 1.0,  # LLM.int8: int8 codes (+ one fp32 scale per output row: INT8_ROW_SCALE_BYTES)
}
QUANT_BYTES[("fp4", False)] = QUANT_BYTES[("nf4", False)]
QUANT_BYTES[("fp4", True)] = QUANT_BYTES[("nf4", True)]
QUANT_BYTES[("int8", True)] = QUANT_BYTES[("int8", False)]
INT8_ROW_SCALE_BYTES = 4  # bitsandbytes Int8Params.SCB: the fp32 absmax of each output row
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 256, "sgd": 0.0}  # 8-bit: m, v + absmax per 256


@dataclass(kw_only=True)
class TrainingSetup:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: the sequence split over cp ranks (ZeRO then shards over dp x cp)
    zero: int = 0
    backend: str = "deepspeed"
    offload_optimizer: str = "none"
    offload_param: str = "none"
    precision: str = "bf16"
    optimizer: str = "adamw"
    peft: str = "none"
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ()
    quant: str = "none"
    double_quant: bool = False
    activation_checkpointing: str = "none"
    micro_batch: int = 1
    seq_len: int = 0  # 0 = model states only (no activations)
    grad_accum: int = 1
    pp_schedule: str = "1f1b"
    sequence_parallel: bool = False
    gpu_mem: float = 0.0  # bytes; 0 = no verdict
    gpus_per_node: int = 8
    host_mem: float = 0.0  # host RAM per node in bytes (for CPU offload); 0 = no verdict

    @property
    def effective_quant(self) -> str:
        """The base's quantization: --quant, else NF4 for QLoRA (--quant none = the config's 'auto')."""
        return resolve_quantization(self.peft, self.quant if self.quant != "none" else "auto")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp


@dataclass
class RankMemory:
    label: str
    first_rank: int
    layers: int
    params: float = 0.0
    grads: float = 0.0
    optimizer_states: float = 0.0
    master_weights: float = 0.0
    activations: float = 0.0
    activations_recompute: float = 0.0  # of `activations`: the checkpointed block recomputed in backward
    logits: float = 0.0
    buffers: float = 0.0
    comm_buffers: float = 0.0  # gradient all-reduce / reduce-scatter buffers
    allocator: float = 0.0  # caching-allocator fragmentation allowance
    cpu_offload: float = 0.0
    nvme_offload: float = 0.0
    params_by_dtype: dict = field(default_factory=dict)
    trainable_params: float = 0.0  # count on this rank (before dp sharding)
    frozen_params: float = 0.0

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer_states + self.master_weights + self.activations
                + self.logits + self.buffers + self.comm_buffers + self.allocator)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        for k in (*KEYS, "activations_recompute"):
            d[k] = int(round(d[k]))
        return d


@dataclass
class MemoryEstimate:
    dims: ModelDims
    setup: TrainingSetup
    ranks: list[RankMemory]
    worst: int
    notes: list[str]
    formulas: dict[str, str]

    @property
    def worst_rank(self) -> RankMemory:
        return self.ranks[self.worst]

    @property
    def fits(self) -> bool | None:
        return None if not self.setup.gpu_mem else self.worst_rank.total <= self.setup.gpu_mem

    def host_ram_per_node(self) -> float:
        per_node = min(self.setup.gpus_per_node, self.setup.world)
        return max(r.cpu_offload for r in self.ranks) * per_node

    @property
    def host_fits(self) -> bool | None:
        """Whether the CPU-offloaded states of a node's ranks fit in --host-mem (None: not asked)."""
        return None if not self.setup.host_mem else self.host_ram_per_node() <= self.setup.host_mem

    def as_dict(self) -> dict:
        w = self.worst_rank
        return {
            "schema_version": 1,
            "model": {"name": self.dims.name, "family": self.dims.family, "total_params": total_params(self.dims)},
            "setup": asdict(self.setup),
            "ranks": [r.as_dict() for r in self.ranks],
            "worst_rank": {"index": self.worst, "label": w.label, "first_rank": w.first_rank, **{
                k: w.as_dict()[k] for k in KEYS}},
            "gpu_mem": self.setup.gpu_mem or None,
            "fits": self.fits,
            "margin": (self.setup.gpu_mem - w.total) if self.setup.gpu_mem else None,
            "host_ram_per_node": int(self.host_ram_per_node()),
            "host_mem": self.setup.host_mem or None,
            "host_fits": self.host_fits,
            "notes": self.notes,
        }


# ---- validation -------------------------------------------------------------------------------------
def validate(d: ModelDims, s: TrainingSetup) -> None:
    errs: list[str] = []
    for name in ("dp", "tp", "pp", "cp", "micro_batch", "grad_accum"):
        if getattr(s, name) < 1:
            errs.append(f"--{name.replace('_', '-')}={getattr(s, name)}: must be >= 1")
    if s.zero not in (0, 1, 2, 3):
        errs.append(f"--zero={s.zero}: use 0, 1, 2 or 3")
    if s.precision not in DTYPE_BYTES:
        errs.append(f"--precision={s.precision}: use fp32, bf16 or fp16")
    if s.optimizer not in OPTIMIZER_BYTES:
        errs.append(f"--optimizer={s.optimizer}: use {', '.join(OPTIMIZER_BYTES)}")
    if s.peft not in PEFT_METHODS:
        errs.append(f"--peft={s.peft}: the estimator models {', '.join(PEFT_METHODS)}")
    if s.backend not in ("native", "deepspeed"):
        errs.append(f"--backend={s.backend}: use native or deepspeed")
    if not d.raw_params:  # the engine's own rules (parallel/dims.py), so no layout is sized that it refuses
        errs.extend(model_split_errors(s.tp, s.pp, num_heads=d.heads, num_kv_heads=d.kv_heads, num_layers=d.layers,
                                       vocab_size=d.vocab, intermediate_size=d.ffn, cp=s.cp))
    elif d.layers and s.pp > d.layers:
        errs.append(f"parallel.pp={s.pp} is more than the model's {d.layers} layers; use at most {d.layers}")
    if (s.tp > 1 or s.pp > 1 or s.seq_len) and d.raw_params and not (d.hidden and d.layers):
        errs.append("--params without --hidden and --layers: tp/pp splits and activations need the model dims; "
                    "pass --hidden H --layers L (and --heads, --vocab) or use --model")
    errs.extend(offload_errors(s.backend, s.zero, s.offload_optimizer, s.offload_param))
    if s.quant != "none" and s.peft == "none":
        errs.append(f"--quant={s.quant}: a quantized base cannot be fully fine-tuned; add --peft lora")
    if s.peft != "none" and d.raw_params:
        errs.append("--peft needs the model dims (per-linear adapter sizes): use --model")
    if s.pp_schedule not in SCHEDULES:
        errs.append(f"parallel.pp_schedule={s.pp_schedule}: use {', '.join(SCHEDULES)}")
    if s.cp > 1 and s.backend != "native":
        errs.append(f"--cp={s.cp}: context parallel runs on the native backend; use --backend native")
    if s.cp > 1 and s.seq_len % (s.cp * (s.tp if s.sequence_parallel else 1)):
        errs.append(f"--seq-len={s.seq_len} must be divisible by --cp={s.cp}" + " x --tp" * s.sequence_parallel)
    if errs:
        raise ConfigError(errs)


# ---- parameters per rank ----------------------------------------------------------------------------
def _targets(d: ModelDims, s: TrainingSetup) -> list[Linear]:
    lins = layer_linears(d)
    if not s.lora_targets:
        return lins

    def match(lin: Linear, t: str) -> bool:
        leaf = lin.name.split(".")[-1]
        return lin.name == t or lin.name.endswith("." + t) or leaf == t.split(".")[0]

    out = [x for x in lins if any(match(x, t) for t in s.lora_targets)]
    if not out:
        names = ", ".join(x.name.split(".")[-1] for x in lins)
        raise ConfigError(f"--lora-targets {','.join(s.lora_targets)}: no linear of {d.family} matches; "
                          f"its linears are {names}")
    return out


def adapter_params(lin: Linear, s: TrainingSetup) -> float:
    """Adapter params of one target linear on one tp rank (sharding follows the base's TP style)."""
    tp, r = s.tp, s.lora_r
    col = lin.style == "col"
    if s.peft == "ia3":
        scales_in = lin.style == "row" and ("mlp" in lin.name or lin.name.startswith("fc") or "4h_to_h" in lin.name)
        return lin.fan_in / tp if scales_in else (lin.fan_out / tp if col else lin.fan_out)
    a = r * lin.fan_in / (1 if col else tp)  # lora_A: replicated (col) / in-sharded (row)
    b = lin.fan_out * r / (tp if col else 1)  # lora_B: out-sharded (col) / replicated (row)
    mag = (lin.fan_out / tp if col else lin.fan_out) if s.peft == "dora" else 0.0
    return a + b + mag


@dataclass
class StageParams:
    linear_w: float  # base linear weights (quantizable)
    other: float  # embeddings, norms, biases, head
    adapters: float
    largest_layer: float
    root: float  # params outside the decoder blocks on this stage
    head: float = 0.0  # the LM head's weight on this stage (tied: the embedding's), per tp rank
    linear_rows: float = 0.0  # output rows of the base linears on this stage, per tp rank (int8 row scales)


def stage_layers(d: ModelDims, pp: int) -> list[int]:
    base, extra = divmod(d.layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def stage_params(d: ModelDims, s: TrainingSetup, stage: int, n_layers: int) -> StageParams:
    tp, first, last = s.tp, stage == 0, stage == s.pp - 1
    pc = param_counts(d)
    if d.raw_params:
        per = d.raw_params / max(d.layers, 1) / tp if d.layers else d.raw_params / tp
        n = n_layers if d.layers else 1
        # without --layers the per-block size is unknown: no ZeRO-3 gather buffer is counted
        return StageParams(linear_w=per * n, other=0.0, adapters=0.0, largest_layer=per if d.layers else 0.0,
                           root=0.0)
    lins = layer_linears(d)
    w = sum(x.fan_in * x.fan_out for x in lins) / tp
    rows = sum(x.fan_out / tp if x.style == "col" else x.fan_out for x in lins)
    b = sum(x.fan_out / tp if x.style == "col" else x.fan_out for x in lins if x.bias)
    per_other = b + pc.per_layer_norms
    root = 0.0
    if first:
        root += pc.vocab_embedding / tp + (pc.embedding - pc.vocab_embedding)
    if last:
        head = pc.head if pc.head else (pc.vocab_embedding if s.pp > 1 else 0)  # tied: the last stage's copy
        root += pc.final_norm + head / tp
    adapters = 0.0
    if s.peft != "none":
        adapters = sum(adapter_params(x, s) for x in _targets(d, s)) * n_layers
    head_w = (pc.head or pc.vocab_embedding) / tp if last else 0.0
    return StageParams(linear_w=w * n_layers, other=per_other * n_layers + root, adapters=adapters,
                       largest_layer=w + per_other, root=root, head=head_w, linear_rows=rows * n_layers)


def largest_module_params(d: ModelDims, tp: int = 1) -> float:
    """Parameters of the largest single module (embedding, head or one linear), per tp rank: the unit DeepSpeed
    ZeRO-3 gathers (it fetches each module's parameters before the module runs), the `largest_layer_params` of
    DeepSpeed's own estimator. `--params` with --layers: one block (an upper bound); without: 0.
    (trellis' DeepSpeed config sets stage3_param_persistence_threshold = 0: no parameter stays whole.)"""
    if d.raw_params:
        return d.raw_params / d.layers / tp if d.layers else 0.0
    pc = param_counts(d)
    return max([pc.vocab_embedding, pc.head] + [x.fan_in * x.fan_out for x in layer_linears(d)]) / tp


# ---- the estimate -----------------------------------------------------------------------------------
def estimate(d: ModelDims, s: TrainingSetup) -> MemoryEstimate:
    validate(d, s)
    c = DTYPE_BYTES[s.precision]
    mixed = c < 4
    native = s.backend == "native"
    store = 4 if native else c  # bytes per stored (non-quantized) param
    opt_b = OPTIMIZER_BYTES[s.optimizer]
    quant = s.effective_quant
    peft = s.peft != "none"
    dp, z = s.dp * s.cp, s.zero  # Nd: the ranks ZeRO shards over (dp x cp: context parallel replicates too)
    notes: list[str] = []
    ranks: list[RankMemory] = []
    for stage, n_layers in enumerate(stage_layers(d, s.pp) if d.layers else [0]):
        sp = stage_params(d, s, stage, n_layers)
        label = f"pp stage {stage}" if s.pp > 1 else "every rank"
        r = RankMemory(label=label, first_rank=stage * s.dp * s.cp * s.tp, layers=n_layers)
        base = sp.linear_w + sp.other
        trainable = sp.adapters if peft else base
        frozen = base if peft else 0.0
        r.trainable_params, r.frozen_params = trainable, frozen
        # params by dtype (before ZeRO-3 / FSDP sharding)
        by: dict[str, float] = {}
        if quant != "none":
            qb = QUANT_BYTES[(quant, s.double_quant)]
            by["4bit" if quant != "int8" else "int8"] = sp.linear_w * qb + (
                sp.linear_rows * INT8_ROW_SCALE_BYTES if quant == "int8" else 0.0)
            by[_dt(store)] = by.get(_dt(store), 0.0) + sp.other * store
        else:
            by[_dt(store)] = frozen * store
        by[_dt(store)] = by.get(_dt(store), 0.0) + (trainable * store if peft else base * store)
        params = sum(by.values())
        grads = trainable * (4 if native else c)
        # DeepSpeed: mixed precision keeps an fp32 master copy; with fp32 training its ZeRO optimizer (stage >= 1)
        # still keeps a flat fp32 partition of the trainable params (measured: 4Ψ/Nd per rank).
        master = trainable * 4 if (not native and (mixed or z >= 1)) else 0.0
        optim = trainable * opt_b
        # ZeRO / FSDP sharding over dp
        if native:
            if z >= 1:
                optim /= dp
            if z >= 2:
                # the packed (4-/8-bit) base stays whole on every dp rank (FSDP2 ignored_params)
                packed = by.get("4bit", 0.0) + by.get("int8", 0.0)
                params, grads = packed + (params - packed) / dp, grads / dp
                by = {k: v if k in ("4bit", "int8") else v / dp for k, v in by.items()}
        else:
            if z >= 1:
                optim, master = optim / dp, master / dp
            if z >= 2:
                # DeepSpeed keeps this rank's gradient partition twice at the optimizer step (measured on a
                # live engine): the compute-dtype partition its hooks reduce into (stage 2 grads_in_partition,
                # stage 3 grad_partitions_flat_buffer) and the fp32 copy the master step reads. `--params N`
                # alone keeps the ZeRO paper's classic accounting (16-bit gradient partition, 2Ψ/Nd).
                grads = (grads if d.raw_params else trainable * (c + 4)) / dp
            if z == 3:
                params /= dp
                by = {k: v / dp for k, v in by.items()}
        # offload
        if native and z == 3 and "cpu" in (s.offload_optimizer, s.offload_param):
            r.cpu_offload = params + grads + optim
            params = grads = optim = 0.0
            notes.append("native CPU offload (FSDP2 CPUOffloadPolicy): sharded params, grads and the optimizer "
                         "step live on the host; blocks are copied to the GPU to run")
        elif not native:
            if s.offload_optimizer != "none":
                moved = optim + master
                dest = "cpu_offload" if s.offload_optimizer == "cpu" else "nvme_offload"
                setattr(r, dest, getattr(r, dest) + moved)
                optim = master = 0.0
                if z >= 2:  # DeepSpeed keeps the fp32 grad partitions in (pinned) host memory; stage 3's
                    # compute-dtype partition buffer too (pinned), stage 2 copies each grad straight to fp32
                    r.cpu_offload += trainable * (4 + (c if z == 3 and not d.raw_params else 0)) / dp
                    grads = 0.0
            if s.offload_param != "none":
                dest = "cpu_offload" if s.offload_param == "cpu" else "nvme_offload"
                setattr(r, dest, getattr(r, dest) + params)
                params = 0.0
        r.params, r.grads, r.optimizer_states, r.master_weights = params, grads, optim, master
        r.params_by_dtype = {k: int(round(v)) for k, v in by.items()} if params else {}
        # transient buffers
        gather_b = c if mixed else 4
        # a packed base is not FSDP-managed: nothing of it is gathered
        gathered_w = 0.0 if quant != "none" else sp.linear_w
        if native and z == 2:
            r.buffers += (gathered_w + sp.other) * gather_b  # all blocks stay gathered fwd -> bwd
        elif native and z == 3:
            layer = sp.largest_layer - (sp.linear_w / max(n_layers, 1) if quant != "none" else 0.0)
            r.buffers += (sp.root + 2 * layer) * gather_b
        elif native and mixed:
            # autocast's low-precision copies of every matmul weight (block linears, LM head, adapters), kept
            # for backward. A 4-bit base dequantizes inside each call and keeps only the packed weight.
            r.buffers += ((sp.linear_w if quant == "none" else 0.0) + sp.head + (sp.adapters if peft else 0.0)) * c
        if not native and z == 3:
            # ZeRO-3 working memory on the GPU, offloaded or not: the largest module's parameters gathered in
            # the compute dtype and its compute-dtype gradients before the reduce-scatter (DeepSpeed's own
            # "largest layer memory", 4 bytes x its params in 16-bit)
            r.buffers += 2 * c * largest_module_params(d, s.tp)
        if s.seq_len:  # a whole training step (with only model states asked for, the classic figures)
            _activations(d, s, stage, n_layers, c, r)
            r.comm_buffers = _comm_buffers(s, sp, native, trainable, n_layers, c) + cp_alltoall_bytes(
                d, tokens=s.micro_batch * s.seq_len // s.cp, tp=s.tp, cp=s.cp, act_bytes=c)
            r.allocator = ALLOCATOR_ALLOWANCE * r.total
        ranks.append(r)
    worst = max(range(len(ranks)), key=lambda i: (ranks[i].total, -i))
    if s.pp > 1 and worst != 0:
        notes.append(f"the worst rank is on {ranks[worst].label} (rank {ranks[worst].first_rank}), not rank 0")
    return MemoryEstimate(d, s, ranks, worst, sorted(set(notes)), formulas(s, native, mixed, quant))


# PyTorch's caching allocator rounds and splits blocks: reserved memory runs a few % above what tensors
# hold (what OOMs is reserved memory). A documented allowance, not a measurement.
ALLOCATOR_ALLOWANCE = 0.05
DS_REDUCE_BUCKET = 5e8  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)
DS_PREFETCH_BUCKET = 5e7  # stage3_prefetch_bucket_size default (elements)


def _comm_buffers(s: TrainingSetup, sp: "StageParams", native: bool, trainable: float, n_layers: int,
                  c: int) -> float:
    """Bytes of the gradient-communication buffers on one rank (transient, at the step's peak)."""
    if native:
        if s.dp * s.cp == 1:
            return 0.0
        if s.zero <= 1:  # the engine all-reduces one flattened fp32 copy of this rank's gradients
            return trainable * 4
        # FSDP2 reduce-scatters one block's unsharded fp32 gradients at a time
        per_block = trainable / max(n_layers, 1) if s.peft != "none" else sp.largest_layer
        return per_block * 4
    if s.zero == 0:
        return 0.0 if s.dp == 1 else trainable * c  # DeepSpeed's flattened all-reduce bucket
    out = min(DS_REDUCE_BUCKET, trainable) * c  # contiguous_gradients: the reduce bucket
    if s.zero == 3:
        out += min(DS_PREFETCH_BUCKET, sp.linear_w + sp.other) * c  # parameter prefetch bucket
    return out


def _dt(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16/fp16"}[nbytes]


def in_flight(s: TrainingSetup, stage: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    if s.pp == 1:
        return 1
    if s.pp_schedule == "gpipe":
        return s.grad_accum
    return min(s.pp - stage, s.grad_accum)


def _activations(d: ModelDims, s: TrainingSetup, stage: int, n_layers: int, c: int, r: RankMemory) -> None:
    # context parallel: this rank's tokens are its sequence chunk; attention keys span the whole sequence
    tokens = s.micro_batch * s.seq_len // s.cp
    k = in_flight(s, stage)
    peft = s.peft != "none"
    adapter = 0.0
    if peft:  # LoRA-family: each target keeps its r-wide lora_A output (IA3 keeps nothing extra)
        adapter = 0.0 if s.peft == "ia3" else s.lora_r * len(_targets(d, s))
    mode = regime(s.precision, s.backend, s.zero)
    lb = per_layer_bytes(d, tokens=tokens, seq=s.seq_len, tp=s.tp, sp=s.sequence_parallel, act_bytes=c,
                         ckpt=s.activation_checkpointing, frozen_base=peft, adapter_elems=adapter, mode=mode,
                         quantized=s.effective_quant != "none")
    ml = model_level_bytes(d, tokens=tokens, seq=s.seq_len // s.cp, tp=s.tp, act_bytes=c, first=stage == 0,
                           last=stage == s.pp - 1, frozen_base=peft, mode=mode, ckpt=s.activation_checkpointing)
    kept = lb["kept"] + (cp_replicated_kv_bytes(d, tokens=tokens, tp=s.tp, cp=s.cp, act_bytes=c)
                         if s.activation_checkpointing == "none" else 0.0)
    r.activations = k * (kept * n_layers + ml["embedding"] + ml["final_norm"]) + lb["recompute"]
    r.activations_recompute = lb["recompute"]
    r.logits = k * ml["logits"]
    if ml["logits"]:
        r.buffers += tokens * d.vocab / s.tp * c  # the logits tensor itself, alive until the loss backward


def formulas(s: TrainingSetup, native: bool, mixed: bool, quant: str) -> dict[str, str]:
    """The formula behind each line (Ψ = trainable params on this rank's tp/pp shard, Nd = dp x cp)."""
    f: dict[str, str] = {}
    z = s.zero
    if native:
        f["params"] = ("fp32 params (they are the master weights)" + (", /Nd (FSDP2 shards)" if z >= 2 else "")
                       + ("; frozen base quantized: " + quant if quant != "none" else ""))
        f["grads"] = "4Ψ (fp32 grads of trainable params)" + (" /Nd" if z >= 2 else "")
        f["master_weights"] = "0: the fp32 params are the master copy (FSDP2 MixedPrecisionPolicy / autocast)"
        f["buffers"] = {0: "autocast low-precision copy of the linear + head (+ adapter) weights" if mixed else "none",
                        1: "autocast low-precision copy of the linear + head (+ adapter) weights" if mixed else "none",
                        2: "reshard_after_forward=False: all blocks' unsharded params stay gathered (compute dtype)",
                        3: "reshard_after_forward=True: root (embedding, norm, head) + 2 blocks gathered"}[z]
    else:
        pb = "2Ψ" if mixed else "4Ψ"
        f["params"] = f"{pb} ({s.precision} params)" + (" /Nd" if z == 3 else "") + (
            "; frozen base quantized: " + quant if quant != "none" else "")
        f["grads"] = (f"{pb} ({s.precision} grads)" if z < 2 else
                      f"({pb} + 4Ψ)/Nd: DeepSpeed's {s.precision} gradient partition + its fp32 copy at the step "
                      f"(offloaded optimizer: the fp32 copy on the host; classic --params accounting: {pb}/Nd)")
        f["master_weights"] = (("4Ψ fp32 master copy" + (" /Nd" if z >= 1 else "")) if mixed else
                           ("4Ψ/Nd flat fp32 partition of DeepSpeed's ZeRO optimizer" if z >= 1 else "0 (fp32 training)"))
        f["buffers"] = ("ZeRO-3: largest module gathered + its 16-bit grads, 2 x compute bytes x its params "
                        "(stays on the GPU with param offload); reduce/prefetch buckets under comm buffers"
                        if z == 3 else "DeepSpeed buckets under comm buffers (with --seq-len)")
    f["optimizer_states"] = {"adamw": "8Ψ (Adam m, v in fp32)", "adamw8bit": "2Ψ + block constants (8-bit m, v)",
                             "sgd": "0 (no momentum)"}[s.optimizer] + (" /Nd" if z >= 1 else "")
    f["activations"] = ("per layer: family-itemized saved tensors (Korthikanti et al. 2022: sbh(34+5as/h) bytes "
                        "for a 16-bit GPT-3 block); /tp for heads and MLP, /tp for the residual region with "
                        "sequence parallel; full checkpointing keeps the block input + one block recomputed, "
                        "selective drops attention internals; x micro-batches in flight "
                        "(1F1B: pp - stage, GPipe: grad_accum); context parallel: seq/cp tokens per rank "
                        "(attention over the whole sequence for heads/cp; kv heads replicated when they do not "
                        "divide cp)")
    f["logits"] = "micro_batch x seq x vocab/tp x 4 bytes: fp32 log-probs kept by the cross-entropy"
    f["comm_buffers"] = ("native: ZeRO-0/1 one flat fp32 copy of the grads (4Ψ), ZeRO-2/3 one block's fp32 grads "
                         "for the reduce-scatter; DeepSpeed: min(reduce_bucket_size 5e8, Ψ) (+ ZeRO-3 prefetch "
                         "bucket 5e7) elements; context parallel: + the all-to-all send/receive buffers of one "
                         "layer's q, k, v; only with --seq-len (a whole step)")
    f["allocator"] = f"{ALLOCATOR_ALLOWANCE:.0%} of the lines above: caching-allocator fragmentation allowance"
    f["cpu_offload"] = "offloaded optimizer state + fp32 master (+ fp32 grads at stage >= 2) / params"
    f["nvme_offload"] = "ZeRO-Infinity: optimizer state + master and/or params on NVMe"
    return f
