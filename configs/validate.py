"""Cross-field rules that need only the config, one function per section; each rule is written once here
and imported where it is needed again (the memory estimator's offload rules, QLoRA's nf4 default, the global
batch once dp is resolved). Model-dependent layout rules live in parallel/dims.py, world-dependent ones run
at start-up."""

from __future__ import annotations

import string
from pathlib import Path

from trellis.errors import ConfigError

from .data_templates import PROMPT_TEMPLATES, shipped_chat_templates
from .schema import PEFT_INIT_ADAPTER_METHODS, PEFT_PROMPT_METHODS, TRAJECTORY_FIELDS, TrainConfig

# Pipeline schedules that split the backward into input and weight gradients (parallel/pipeline.py)
ZERO_BUBBLE_SCHEDULES = ("interleaved_zb", "zbv", "dualpipev")

# PEFT methods known to break inside peft on a 4-bit base (measured: LoKr/LoHa/HRA).
_NO_4BIT_METHODS = ("lokr", "loha", "hra")


def resolve_quantization(method: str, quantize_base: str = "auto") -> str:
    """The base's quantization: `quantize_base` when set, else "nf4" for qlora and "none" otherwise."""
    if quantize_base == "auto":
        return "nf4" if method == "qlora" else "none"
    return quantize_base


def base_quantization(cfg: TrainConfig) -> str:
    """Resolved `peft.quantize_base`: "nf4" for qlora unless set, else "none" unless set."""
    return resolve_quantization(cfg.peft.method, cfg.peft.quantize_base)


def offload_errors(backend: str, stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
    """Where ZeRO offload exists: param offload is ZeRO-3's, optimizer offload needs a sharded optimizer
    (stage >= 1), NVMe is DeepSpeed's (ZeRO-Infinity) and the native backend offloads to CPU with FSDP2's
    CPUOffloadPolicy, i.e. at stage 3 only. Shared by the config and the memory estimator / planner."""
    e = []
    if offload_param != "none" and stage != 3:
        e.append(f"zero.offload_param={offload_param!r} needs zero.stage=3 (got {stage})")
    if offload_optimizer != "none" and stage == 0:
        e.append(f"zero.offload_optimizer={offload_optimizer!r} needs zero.stage >= 1")
    if "nvme" in (offload_optimizer, offload_param) and backend != "deepspeed":
        e.append("zero.offload_*='nvme' needs zero.backend='deepspeed' (ZeRO-Infinity); the native "
                 "backend offloads to 'cpu' only")
    if backend == "native" and stage in (1, 2) and offload_optimizer == "cpu":
        e.append(f"zero.offload_optimizer='cpu' with the native backend needs zero.stage=3 (FSDP2 "
                 f"CPUOffloadPolicy), got {stage}; use zero.stage=3 or zero.backend='deepspeed'")
    return e


def global_batch_errors(cfg: TrainConfig, dp: int) -> list[str]:
    """train.global_batch_size (0 = derived) must equal micro batch x grad_accum x the resolved dp."""
    t = cfg.train
    derived = t.micro_batch_size * t.grad_accum * dp
    if not t.global_batch_size or derived == t.global_batch_size:
        return []
    return [f"train.global_batch_size={t.global_batch_size} != train.micro_batch_size "
            f"({t.micro_batch_size}) x train.grad_accum ({t.grad_accum}) x parallel.dp ({dp}) "
            f"= {derived}; change one of them or set train.global_batch_size=0 to derive it"]


def validate(cfg: TrainConfig) -> None:
    """Every section's rules; all problems in one ConfigError."""
    e: list[str] = []
    for section in (_model, _parallel, _train, _data, _precision, _zero, _peft, _checkpoint, _logging, _launcher):
        e.extend(section(cfg))
    if e:
        raise ConfigError(e)


def _model(cfg: TrainConfig) -> list[str]:
    p = Path(cfg.model.path)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        return [f"model.path={cfg.model.path!r} is a PEFT adapter (adapter_config.json), not a model; set model.path "
                f"to its base model and peft.init_adapter={cfg.model.path!r} to continue training the adapter"]
    return []


def _parallel(cfg: TrainConfig) -> list[str]:
    p, e = cfg.parallel, []
    for name in ("dp", "pp", "tp"):
        v = getattr(p, name)
        if v == 0 or v < -1:
            e.append(f"parallel.{name}={v}: must be a positive integer, or -1 for 'whatever is left'")
    if [p.dp, p.pp, p.tp].count(-1) > 1:
        e.append("parallel: only one of dp, pp, tp may be -1 (the axis that takes what is left)")
    if p.timeout_s <= 0:
        e.append(f"parallel.timeout_s={p.timeout_s}: must be > 0 seconds")
    if p.sequence_parallel and p.tp == 1:
        e.append("parallel.sequence_parallel=true needs parallel.tp > 1; set parallel.tp or turn it off")
    if p.sequence_parallel and p.tp > 1 and cfg.data.seq_len % p.tp:
        e.append(f"parallel.sequence_parallel: data.seq_len={cfg.data.seq_len} must be divisible by "
                 f"parallel.tp={p.tp}")
    e.extend(_context_parallel(cfg))
    if p.pp > 1 and p.pp_schedule in ZERO_BUBBLE_SCHEDULES and cfg.zero.stage >= 2:
        # measured: torch's weight-gradient pass misses FSDP2's unsharded parameters (dp2·pp2 zbv ZeRO-3: loss off
        # by 1e-1 against the 1-process reference)
        e.append(f"parallel.pp_schedule={p.pp_schedule!r} with zero.stage={cfg.zero.stage}: the zero-bubble weight-"
                 "gradient pass does not compose with FSDP2's sharded parameters yet; use zero.stage=0 or 1, or "
                 "parallel.pp_schedule='1f1b' or 'interleaved_1f1b' with ZeRO-2/3")
    if p.pp_split not in ("even", "params"):
        try:
            points = [int(x) for x in p.pp_split.split(",")]
            if points != sorted(set(points)) or points[0] <= 0:
                raise ValueError
        except ValueError:
            e.append(f"parallel.pp_split={p.pp_split!r}: use 'even', 'params', or increasing layer "
                     "indices like '2,4'")
        else:
            if p.pp > 0 and len(points) != p.pp - 1:
                e.append(f"parallel.pp_split={p.pp_split!r}: {len(points)} split points make "
                         f"{len(points) + 1} stages but parallel.pp={p.pp}; give {p.pp - 1} points")
    return e


def _train(cfg: TrainConfig) -> list[str]:
    p, t, e = cfg.parallel, cfg.train, []
    for name in ("micro_batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            e.append(f"train.{name}={getattr(t, name)}: must be >= 1")
    e.extend(_length_errors(t))
    if t.lr <= 0:
        e.append(f"train.lr={t.lr}: must be > 0")
    if t.min_lr < 0 or t.min_lr > t.lr:
        e.append(f"train.min_lr={t.min_lr}: must be between 0 and train.lr={t.lr}; or set train.min_lr_ratio "
                 "(a fraction of train.lr) instead")
    if not 0 <= t.min_lr_ratio <= 1:
        e.append(f"train.min_lr_ratio={t.min_lr_ratio}: must be between 0 and 1 (a fraction of train.lr)")

    if t.warmup_steps < 0:
        e.append(f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    if t.grad_clip < 0:
        e.append(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
    if t.max_nonfinite_steps < 1:
        e.append(f"train.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 1")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        e.append(f"train.beta1/beta2=({t.beta1}, {t.beta2}): each must be in [0, 1)")
    if t.weight_decay < 0:
        e.append(f"train.weight_decay={t.weight_decay}: must be >= 0")
    if t.global_batch_size < 0:
        e.append(f"train.global_batch_size={t.global_batch_size}: must be >= 0 (0 = derived)")
    elif p.dp > 0:  # dp = -1: checked once the world size resolves it (engine/trainer.py)
        e.extend(global_batch_errors(cfg, p.dp))
    if p.pp > 1 and t.grad_accum < p.pp:
        e.append(f"train.grad_accum={t.grad_accum}: pipeline parallel needs at least parallel.pp="
                 f"{p.pp} micro-batches per step; set train.grad_accum >= {p.pp}")
    if t.objective == "dpo":
        e.extend(_dpo_errors(cfg))
    if t.dpo_beta <= 0:
        e.append(f"train.dpo_beta={t.dpo_beta}: must be > 0")
    e.extend(compile_errors(cfg))
    if t.optimizer == "adamw8bit" and cfg.zero.backend == "deepspeed":
        e.append("train.optimizer='adamw8bit' is not available with zero.backend='deepspeed'; "
                 "use 'adamw' or the native backend")
    return e


def compile_errors(cfg: TrainConfig) -> list[str]:
    """train.compile=true: the combinations that cannot run compiled."""
    if not cfg.train.compile:
        return []
    e = []
    if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule in ZERO_BUBBLE_SCHEDULES:
        # torch.distributed.pipelining splits the backward into input and weight gradients only in eager mode
        e.append(f"train.compile=true: parallel.pp_schedule={cfg.parallel.pp_schedule!r} (zero-bubble) rejects "
                 "compiled stages; use parallel.pp_schedule='1f1b' or 'interleaved_1f1b', or train.compile=false")
    if cfg.zero.backend == "deepspeed":
        e.append("train.compile=true is not available with zero.backend='deepspeed'; use zero.backend='native' "
                 "or train.compile=false")
    if cfg.parallel.tp != 1:  # DTensor's redistribute backward gets a plain gradient from the compiled block
        e.append(f"train.compile=true needs parallel.tp=1 (got {cfg.parallel.tp}): compiled tensor-parallel blocks "
                 "fail in backward with torch's DTensor; use train.compile=false with tensor parallel")
    return e


def _length_errors(t) -> list[str]:
    """train.steps (0 = not given) or train.epochs sets the run's length; and when evaluation happens."""
    e = []
    if t.epochs < 0 or t.steps < 0:
        e.append(f"train.steps={t.steps}, train.epochs={t.epochs}: must be >= 0")
    elif t.epochs and t.steps:
        e.append(f"train.steps={t.steps} and train.epochs={t.epochs} both set the run's length; give one (set "
                 "train.steps=0 to train by epochs, e.g. over a preset that sets steps)")
    if t.eval_interval < 0:
        e.append(f"train.eval_interval={t.eval_interval}: must be >= 0 (0 = only after training)")
    elif t.eval_interval and not t.eval_batches:
        e.append(f"train.eval_interval={t.eval_interval} needs train.eval_batches >= 1 (micro-batches per evaluation)")
    return e


def _data(cfg: TrainConfig) -> list[str]:
    d = cfg.data
    e = [f"data.seq_len={d.seq_len}: must be >= 2"] if d.seq_len < 2 else []
    if not 0 <= d.eval_fraction < 1:
        e.append(f"data.eval_fraction={d.eval_fraction}: must be in [0, 1)")
    if d.eval_fraction and d.eval_path:
        e.append("data.eval_path and data.eval_fraction both choose the eval set; give one")
    if (d.eval_fraction or d.eval_path) and not cfg.train.eval_batches:
        e.append("data.eval_path / data.eval_fraction set but train.eval_batches=0; set train.eval_batches "
                 "(micro-batches per evaluation)")
    if d.type == "preference" and d.packing not in ("auto", "pad"):
        e.append(f"data.packing={d.packing!r}: preference records are batched one pair per row; use 'pad' or 'auto'")
    for name in ("text_field", "prompt_field", "response_field", "messages_field", "chosen_field", "rejected_field"):
        if not getattr(d, name):
            e.append(f"data.{name}: must name a record field, got ''")
    e.extend(prompt_template_errors(d.prompt_template))
    if d.chat_template and d.chat_template not in shipped_chat_templates() and not Path(d.chat_template).is_file():
        e.append(f"data.chat_template={d.chat_template!r}: no such file and not a shipped template "
                 f"({', '.join(shipped_chat_templates())}); give a Jinja file or a shipped name")
    return e


def prompt_template_errors(template: str) -> list[str]:
    """data.prompt_template is "", a shipped name, or a str.format string naming at least one record field."""
    if not template or template in PROMPT_TEMPLATES:
        return []
    if "{" not in template:
        return [f"data.prompt_template={template!r}: not a shipped template ({', '.join(PROMPT_TEMPLATES)}) and "
                "names no field; write a str.format template such as '{instruction}\\n\\n{input}'"]
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        return [f"data.prompt_template={template!r}: not a valid str.format template ({err}); write fields as "
                "{name} and literal braces as {{ }}"]
    if not all(n.isidentifier() for n in names):
        return [f"data.prompt_template={template!r}: fields must be plain record field names like {{instruction}} "
                f"(got {[n for n in names if not n.isidentifier()]})"]
    return []


def _precision(cfg: TrainConfig) -> list[str]:
    pr, e = cfg.precision, []
    if pr.loss_scale != "dynamic":
        try:
            if float(pr.loss_scale) <= 0:
                raise ValueError
        except ValueError:
            e.append(f"precision.loss_scale={pr.loss_scale!r}: fp16 needs loss scaling; use "
                     "'dynamic' or a positive static scale like '1024'")
    if pr.dtype == "fp16":
        if pr.loss_scale_window < 1:
            e.append(f"precision.loss_scale_window={pr.loss_scale_window}: must be >= 1")
        if pr.hysteresis < 1:
            e.append(f"precision.hysteresis={pr.hysteresis}: must be >= 1")
        if pr.min_loss_scale <= 0:
            e.append(f"precision.min_loss_scale={pr.min_loss_scale}: must be > 0")
        if not 0 <= pr.initial_scale_power <= 64:
            e.append(f"precision.initial_scale_power={pr.initial_scale_power}: must be in 0..64")
        elif pr.min_loss_scale > 2.0 ** pr.initial_scale_power:
            e.append(f"precision.min_loss_scale={pr.min_loss_scale} is above the initial scale "
                     f"2^{pr.initial_scale_power}; lower it or raise precision.initial_scale_power")
    return e


def _context_parallel(cfg: TrainConfig) -> list[str]:
    """parallel.cp: the sequence split over cp ranks (parallel/context_parallel.py), and what it does not
    compose with yet."""
    p, cp = cfg.parallel, cfg.parallel.cp
    if cp < 1:
        return [f"parallel.cp={cp}: must be a positive integer (1 = no context parallel; -1 is for dp/pp/tp)"]
    if cp == 1:
        return []
    e = []
    split = cp * p.tp if p.sequence_parallel else cp
    if cfg.data.seq_len % split:
        what = f"parallel.cp x parallel.tp = {split} (sequence parallel)" if p.sequence_parallel else f"parallel.cp={cp}"
        e.append(f"data.seq_len={cfg.data.seq_len} must be divisible by {what}: every rank gets an equal chunk; "
                 f"use a seq_len that is a multiple of {split}")
    refuse = []
    if cfg.zero.backend == "deepspeed":
        refuse.append(("zero.backend='deepspeed'", "use zero.backend='native'"))
    if cfg.train.compile:
        refuse.append(("train.compile=true", "set train.compile=false"))
    if cfg.peft.method in PEFT_PROMPT_METHODS:
        refuse.append((f"peft.method={cfg.peft.method!r} (virtual tokens in front of the sequence)",
                       "use lora, dora, qlora or ia3"))
    if cfg.peft.method == "adalora":
        refuse.append(("peft.method='adalora'", "use lora or dora"))
    if cfg.train.objective == "dpo":
        refuse.append(("train.objective='dpo' (per-sequence log-probabilities)", "use parallel.cp=1 for DPO"))
    for what, fix in refuse:
        e.append(f"parallel.cp={cp} with {what}: not supported with context parallel yet; {fix}, or parallel.cp=1")
    return e


def _zero(cfg: TrainConfig) -> list[str]:
    p, z = cfg.parallel, cfg.zero
    e = offload_errors(z.backend, z.stage, z.offload_optimizer, z.offload_param)
    if "nvme" in (z.offload_optimizer, z.offload_param) and not z.nvme_path:
        e.append("zero.nvme_path: required when offloading to nvme; set it to a fast local directory")
    if z.backend == "deepspeed" and (p.tp > 1 or p.pp > 1):
        e.append(f"zero.backend='deepspeed' supports data parallel only in trellis (got parallel.tp={p.tp}, "
                 f"parallel.pp={p.pp}); use zero.backend='native' for tensor/pipeline parallel")
    if z.deepspeed_config and z.backend != "deepspeed":
        e.append("zero.deepspeed_config is set but zero.backend is 'native'; set zero.backend='deepspeed'")
    return e


def _dpo_errors(cfg: TrainConfig) -> list[str]:
    """train.objective='dpo' (engine/dpo.py): preference pairs, and a reference the engine can build."""
    e = []
    if cfg.data.type != "preference":
        e.append(f"train.objective='dpo' needs preference pairs: set data.type='preference' (got "
                 f"data.type={cfg.data.type!r})")
    m = cfg.peft.method
    if m in PEFT_PROMPT_METHODS or (m == "ia3" and cfg.parallel.tp > 1):
        e.append(f"train.objective='dpo' with peft.method={m!r}" + (" under parallel.tp > 1" if m == "ia3" else "")
                 + ": its adapters cannot be disabled for the reference pass; use 'lora', 'dora' or 'qlora'")
    return e


def _peft(cfg: TrainConfig) -> list[str]:
    e = []
    q = base_quantization(cfg)
    if q != "none" and cfg.peft.method in _NO_4BIT_METHODS:
        e.append(f"peft.method={cfg.peft.method!r} breaks inside peft on a 4-bit base; use lora/dora/ia3 "
                 "for QLoRA, or set peft.quantize_base='none'")
    if q == "int8" and cfg.parallel.tp > 1:
        e.append(f"peft.quantize_base='int8' with parallel.tp={cfg.parallel.tp}: the 8-bit base is not tensor-"
                 "parallel yet; use parallel.tp=1 (dp and pp work), or peft.quantize_base='nf4' under tp")
    if q == "int8" and cfg.zero.backend == "deepspeed":
        e.append("peft.quantize_base='int8' needs zero.backend='native' (the 8-bit base stays whole outside "
                 "FSDP there); DeepSpeed's ZeRO would partition the int8 weights")
    if q != "none" and cfg.peft.method == "none":
        e.append("peft.quantize_base is set but peft.method='none'; a 4-bit base needs an adapter method "
                 "(e.g. peft.method='qlora')")
    if cfg.peft.method != "none":
        if cfg.peft.r < 1:
            e.append(f"peft.r={cfg.peft.r}: must be >= 1")
        if cfg.peft.method in PEFT_PROMPT_METHODS and cfg.peft.num_virtual_tokens < 1:
            e.append(f"peft.num_virtual_tokens={cfg.peft.num_virtual_tokens}: must be >= 1")
        if cfg.peft.method == "adalora":
            e.extend(_adalora_errors(cfg))
    if cfg.peft.init_adapter and cfg.peft.method not in PEFT_INIT_ADAPTER_METHODS:
        e.append(f"peft.init_adapter is set but peft.method={cfg.peft.method!r}; continuing an adapter supports "
                 f"peft.method {', '.join(PEFT_INIT_ADAPTER_METHODS)} (set it to the adapter's method)")
    return e


def _checkpoint(cfg: TrainConfig) -> list[str]:
    c, e = cfg.checkpoint, []
    if (c.interval or c.interval_seconds) and not c.dir:
        e.append("checkpoint.interval is set but checkpoint.dir is empty; set checkpoint.dir")
    if c.interval < 0 or c.interval_seconds < 0:
        e.append("checkpoint.interval / interval_seconds: must be >= 0")
    if c.async_save:
        e.append("checkpoint.async_save=true is not supported yet (saves are synchronous and atomic); set it to false")
    if c.keep_last_k < 1:
        e.append(f"checkpoint.keep_last_k={c.keep_last_k}: must be >= 1")
    if c.resume not in ("none", "auto") and not c.resume:
        e.append("checkpoint.resume: use 'none', 'auto' or a checkpoint directory")
    if c.resume == "auto" and not c.dir:
        e.append("checkpoint.resume='auto' needs checkpoint.dir to search in")
    elif c.resume not in ("none", "auto") and c.resume:
        # an explicit path: never a silent fresh start
        if not c.dir:
            e.append(f"checkpoint.resume={c.resume!r} needs checkpoint.dir (where the resumed run saves); set it")
        if not Path(c.resume).is_dir():
            e.append(f"checkpoint.resume={c.resume!r}: no such checkpoint directory; give a step-N directory, "
                     "or 'auto' for the newest valid one in checkpoint.dir")
    unknown = [f for f in c.resume_allow_change if f not in TRAJECTORY_FIELDS]
    if unknown:
        e.append(f"checkpoint.resume_allow_change (--resume-allow-change): {', '.join(unknown)} not a trajectory "
                 f"field; use any of {', '.join(TRAJECTORY_FIELDS)} (layout, precision and ZeRO may change freely)")
    if c.lease_interval_s <= 0 or c.lease_timeout_s < 0:
        e.append("checkpoint.lease_interval_s must be > 0 and checkpoint.lease_timeout_s >= 0 (0 = automatic)")
    return e


# Tracking backends: key -> (module that must be importable, the extra that installs it).
TRACKERS = {"wandb_project": ("wandb", "wandb"), "mlflow_tracking_uri": ("mlflow", "mlflow")}


def _logging(cfg: TrainConfig) -> list[str]:
    import importlib.util

    n = cfg.logging.log_interval
    e = [f"logging.log_interval={n}: must be >= 1"] if n < 1 else []
    for key, (module, extra) in TRACKERS.items():
        if getattr(cfg.logging, key) and importlib.util.find_spec(module) is None:  # found, not imported
            e.append(f"logging.{key} needs the {module} package: pip install 'trellis-train[{extra}]' "
                     f"(or unset logging.{key})")
    return e


def _launcher(cfg: TrainConfig) -> list[str]:
    la, e = cfg.launcher, []
    if la.nproc_per_node < 0 or la.nnodes < 1:
        e.append("launcher.nproc_per_node must be >= 0 and launcher.nnodes >= 1")
    if la.stop_timeout_s <= 0:
        e.append(f"launcher.stop_timeout_s={la.stop_timeout_s}: must be > 0 (seconds for the final save)")
    if not 0 <= la.master_port < 65536:
        e.append(f"launcher.master_port={la.master_port}: must be a TCP port (0 = pick a free one)")
    return e


def _adalora_errors(cfg: TrainConfig) -> list[str]:
    """AdaLoRA's schedule (peft's own rules, worded with trellis's field names) and the layouts where its
    rank allocation is correct (explicit tp/pp here; -1 axes are checked once resolved, at start-up)."""
    p, steps, e = cfg.peft, cfg.train.steps, []
    if p.adalora_target_r < 0 or p.adalora_target_r > p.r:
        e.append(f"peft.adalora_target_r={p.adalora_target_r}: must be between 1 and peft.r={p.r} "
                 "(0 = peft.r // 2)")
    for name in ("adalora_tinit", "adalora_tfinal"):
        if getattr(p, name) < 0:
            e.append(f"peft.{name}={getattr(p, name)}: must be >= 0")
    if p.adalora_delta_t < 1:
        e.append(f"peft.adalora_delta_t={p.adalora_delta_t}: must be >= 1 (steps between rank allocations)")
    for name in ("adalora_beta1", "adalora_beta2"):
        if not 0 < getattr(p, name) < 1:
            e.append(f"peft.{name}={getattr(p, name)}: must be in (0, 1)")
    if p.adalora_orth_reg_weight < 0:
        e.append(f"peft.adalora_orth_reg_weight={p.adalora_orth_reg_weight}: must be >= 0")
    if steps and p.adalora_tinit >= 0 and p.adalora_tfinal >= 0 and p.adalora_tinit >= steps - p.adalora_tfinal:
        e.append(f"peft.adalora_tinit={p.adalora_tinit}, peft.adalora_tfinal={p.adalora_tfinal} with train.steps="
                 f"{steps} leave no budgeting phase (AdaLoRA needs tinit < train.steps - tfinal); lower them or "
                 "raise train.steps")
    e.extend(adalora_layout_errors(cfg, max(cfg.parallel.tp, 1), max(cfg.parallel.pp, 1)))
    return e


ADALORA_LAYOUTS = "parallel.tp=1, parallel.pp=1, zero.backend='native' with zero.stage 0 or 1 (any parallel.dp)"


def adalora_layout_errors(cfg: TrainConfig, tp: int, pp: int) -> list[str]:
    """AdaLoRA's rank allocator needs whole adapter tensors and whole dp-summed grads on every rank."""
    if cfg.peft.method != "adalora":
        return []
    bad = []
    if tp != 1:
        bad.append(f"parallel.tp={tp} (adapters sharded over tp)")
    if pp != 1:
        bad.append(f"parallel.pp={pp} (each stage would budget only its own layers)")
    if cfg.zero.backend != "native":
        bad.append(f"zero.backend={cfg.zero.backend!r}")
    elif cfg.zero.stage >= 2:
        bad.append(f"zero.stage={cfg.zero.stage} (grads and params sharded over dp)")
    if not bad:
        return []
    return [f"peft.method='adalora' with {', '.join(bad)}: AdaLoRA's rank allocation needs whole adapter "
            f"tensors and grads on every rank; it works with {ADALORA_LAYOUTS}"]
