"""The training config: nested keyword-only dataclasses, one per TOML section.

Field names are a public contract (docs, presets, `--section.key=value` overrides, other
subcommands read them). Extend freely; never rename. Validation that involves one field lives in
`Literal`/type annotations and `_checks`; cross-field rules live in `configs.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# peft.method values that learn virtual tokens / key-value prefixes instead of adapter weights
PEFT_PROMPT_METHODS = ("prefix", "prompt", "ptuning", "ptuning_v2")
# of those, the ones with a key/value prefix per layer (prefix tuning; P-tuning v2 = its reparameterised form)
PEFT_PREFIX_METHODS = ("prefix", "ptuning_v2")
# peft.method values whose PEFT-format adapters peft.init_adapter can continue (engine/peft/init_adapter.py)
PEFT_INIT_ADAPTER_METHODS = ("lora", "rslora", "dora", "qlora", "ia3")


@dataclass(kw_only=True)
class ModelConfig:
    # A directory holding a HF `config.json` (and weights, for pretrained init), a `config.json`
    # file, or the name of a shipped model config under configs/models/ (e.g. "tiny-llama").
    path: str = "tiny-llama"
    # "auto": load weights with from_pretrained when the directory has them, else random init.
    init: Literal["auto", "random", "pretrained"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Tokenizer directory or tokenizer.json; "" = the model directory's, else the shipped one.
    tokenizer: str = ""


@dataclass(kw_only=True)
class DataConfig:
    # A file, a directory (recursive), a glob, or a `datasets.save_to_disk` directory of .txt / .jsonl / .json /
    # .parquet / .arrow files; "builtin:demo" = the corpus shipped with trellis (docs/DATA.md "Sources").
    path: str = "builtin:demo"
    # What a record is: the pretraining text stream, a prompt + response, a chat (messages) or a preference pair.
    type: Literal["text", "prompt_response", "chat", "preference"] = "text"
    # Storage format of the files; "auto" picks by extension, any other value reads every file that way.
    format: Literal["auto", "text", "jsonl", "parquet", "arrow"] = "auto"
    text_field: str = "text"
    # Record fields read by data.type prompt_response / chat / preference.
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # The prompt as a str.format template over the record's fields, or a shipped name ("alpaca"); "" = prompt_field.
    prompt_template: str = ""
    # Jinja chat template: a file or a shipped name ("chatml"); "" = the tokenizer's own chat_template.
    chat_template: str = ""
    # Count the prompt / system / user tokens in the loss too (default: only the response / assistant tokens).
    train_on_prompt: bool = False
    # A sample longer than a row: "right" = cut its end, "drop" = leave it out (counted in the run summary).
    truncation: Literal["right", "drop"] = "right"
    seq_len: int = 128
    shuffle: bool = True
    # How samples become rows: "concat" (one token stream), "document" (whole samples, no attention across them),
    # "pad" (one sample per row); "auto" = concat for text, pad for preference, document otherwise.
    packing: Literal["auto", "concat", "document", "pad"] = "auto"
    # Root of the prepared-corpus cache ("" = $TRELLIS_CACHE or ~/.cache/trellis/data); see docs/DATA.md.
    cache_dir: str = ""
    # Evaluation records from another source (file, directory or prepared corpus); "" = none.
    eval_path: str = ""
    # Or this fraction of data.path's records, split off by train.seed (0 = the held-out tail of rows).
    eval_fraction: float = 0.0


@dataclass(kw_only=True)
class ParallelConfig:
    # -1 = whatever is left of the world size after the other axes (at most one axis).
    dp: int = -1
    pp: int = 1
    tp: int = 1
    # Context parallel (docs/CONTEXT_PARALLEL.md): each sequence split over cp ranks, attention exact by an
    # all-to-all over heads (DeepSpeed-Ulysses). data.seq_len and the heads (x tp) must divide by it.
    cp: int = 1
    sequence_parallel: bool = False
    # One stage per rank: "1f1b", "gpipe". Two virtual stages per rank: "interleaved_1f1b", and the zero-bubble
    # schedules "interleaved_zb" (ZB1P, round-robin), "zbv" and "dualpipev" (V placement: stages r and 2pp-1-r).
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"] = "1f1b"
    # "even" (by layers), "params" (by parameter count), or explicit split points "4,8".
    pp_split: str = "even"
    # Collective timeout; a dead peer ends the job after this instead of hanging.
    timeout_s: float = 300.0

    def world_size(self) -> int:
        """dp x pp x cp x tp with a -1 axis read as 1: the ranks this layout needs at least (what trellis starts
        itself, and what `trellis launch` spreads over the nodes, when nothing else says)."""
        return max(self.dp, 1) * max(self.pp, 1) * max(self.cp, 1) * max(self.tp, 1)


@dataclass(kw_only=True)
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 0
    backend: Literal["native", "deepspeed"] = "native"
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str = ""
    pin_memory: bool = False
    # A stock DeepSpeed JSON used as-is by the deepspeed backend (`--deepspeed` sets it).
    deepspeed_config: str = ""


@dataclass(kw_only=True)
class PrecisionConfig:
    # Compute dtype. Master weights and gradient reduction are always fp32.
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # fp16 only: "dynamic" or a static scale written as a number (e.g. "1024").
    loss_scale: str = "dynamic"
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass(kw_only=True)
class ActivationCheckpointingConfig:
    mode: Literal["none", "full", "selective"] = "none"


@dataclass(kw_only=True)
class TrainLoopConfig:
    micro_batch_size: int = 1
    grad_accum: int = 1
    # 0 = micro_batch_size × grad_accum × dp; when set it must equal that product.
    global_batch_size: int = 0
    # Optimizer steps; 0 = 10, or the length train.epochs sets (give one of the two).
    steps: int = 0
    # > 0: train this many passes over the training rows (steps = epochs x rows // global batch).
    epochs: int = 0
    lr: float = 3e-4
    min_lr: float = 0.0
    # The floor as a fraction of lr, used when min_lr is 0: 0.1 decays to lr / 10 whatever lr a JSON or override sets.
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # 0 disables clipping.
    grad_clip: float = 1.0
    seed: int = 1234
    # Evaluate after training on this many held-out batches (0 = skip).
    eval_batches: int = 0
    # > 0: also evaluate every N steps (eval_loss in the metrics JSONL record of that step).
    eval_interval: int = 0
    # A step whose loss or gradient norm is inf/nan (agreed over the world) is skipped (no weights change;
    # fp16 overflows are the loss scaler's); this many such steps in a row stop the run with an error.
    max_nonfinite_steps: int = 3
    # The training objective: causal-LM cross-entropy, or DPO on preference pairs (not available yet).
    objective: Literal["causal_lm", "dpo"] = "causal_lm"
    # DPO's beta (the KL strength of the sigmoid loss); read only with train.objective='dpo'.
    dpo_beta: float = 0.1
    # torch.compile each decoder block (inductor; the first steps pay the compilation). Native backend only;
    # not with the zero-bubble pipeline schedules (they reject compiled stages).
    compile: bool = False

    def __post_init__(self):
        # steps = 0 means "not given": the default length unless epochs sets it (resolved with the dataset).
        if self.steps == 0 and self.epochs == 0:
            self.steps = 10


@dataclass(kw_only=True)
class PeftConfig:
    method: Literal[
        "none", "lora", "rslora", "dora", "qlora", "ia3", "prefix", "prompt", "ptuning", "ptuning_v2",
        "adalora", "lokr", "loha", "hra",
    ] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Empty = the family's default targets (attention + MLP projections).
    target_modules: list[str] = field(default_factory=list)
    num_virtual_tokens: int = 8
    # Base linears quantized with bitsandbytes: 4 bit (nf4/fp4) or LLM.int8 (int8: Linear8bitLt, int8 rows +
    # fp32 row scales, what prepare_model_for_kbit_training users load). "qlora" = lora with nf4 unless set.
    quantize_base: Literal["auto", "none", "nf4", "fp4", "int8"] = "auto"
    double_quant: bool = True
    compute_dtype: Literal["fp32", "bf16"] = "fp32"
    # AdaLoRA (peft.method = "adalora"; peft.r is init_r, total_step = train.steps), peft's defaults:
    # the rank budget falls from r to adalora_target_r per module (0 = r // 2) between step adalora_tinit
    # and train.steps - adalora_tfinal, re-allocated every adalora_delta_t steps by importance EMAs.
    adalora_target_r: int = 0
    adalora_tinit: int = 0
    adalora_tfinal: int = 0
    adalora_delta_t: int = 1
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg_weight: float = 0.5
    # A PEFT-format adapter dir (adapter_config.json + adapter_model.safetensors) to continue training from.
    init_adapter: str = ""


# Config fields that change what a run trains on or how (its trajectory). A resume that changes one is refused
# unless checkpoint.resume_allow_change (CLI --resume-allow-change FIELD,...) names it; layout, precision, ZeRO
# stage and backend may change freely (the checkpoint re-shards). train.global_batch_size stands for the
# global batch the run actually uses. Fields a checkpoint's config lacks (written before the field existed)
# are not compared (engine/checkpoint/checkpointer.py: trajectory_changes).
TRAJECTORY_FIELDS = (
    "model.path", "data.path", "data.format", "data.text_field", "data.type", "data.prompt_field",
    "data.response_field", "data.messages_field", "data.chosen_field", "data.rejected_field", "data.prompt_template",
    "data.chat_template", "data.train_on_prompt", "data.truncation", "data.packing", "data.seq_len", "data.shuffle",
    "train.global_batch_size", "train.seed", "train.objective", "train.dpo_beta", "peft.method",
    "peft.target_modules", "peft.r", "peft.alpha", "peft.num_virtual_tokens",
)


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = ""
    # Save every N optimizer steps (0 = only at the end / on signal when dir is set).
    interval: int = 0
    interval_seconds: float = 0.0
    keep_last_k: int = 3
    async_save: bool = False
    # "none" | "auto" (newest valid checkpoint in dir, else start fresh) | a step directory.
    resume: str = "none"
    save_on_signal: bool = True
    # A save that fails (disk full, permission, I/O): "stop" the run (exit 1), or "continue" without that
    # checkpoint (interval saves only; the final save failing always stops). The partial step-N.tmp is removed.
    on_save_error: Literal["stop", "continue"] = "stop"
    # Trajectory fields (engine/checkpoint/checkpointer.py TRAJECTORY_FIELDS) a resume may change; CLI
    # --resume-allow-change FIELD,...
    resume_allow_change: list[str] = field(default_factory=list)
    # Exclusive lease <dir>/.trellis-lock (engine/checkpoint/lease.py): heartbeat period, and the age after which another
    # run takes a lease over (0 = 3 x the holder's interval + 10 s).
    lease_interval_s: float = 30.0
    lease_timeout_s: float = 0.0


@dataclass(kw_only=True)
class LoggingConfig:
    metrics_file: str = "runs/metrics.jsonl"
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    log_interval: int = 1
    tensorboard_dir: str = ""
    # Weights & Biases project ("" = off; extra `trellis-train[wandb]`). WANDB_MODE=offline works without network.
    wandb_project: str = ""
    # MLflow tracking URI ("" = off; extra `trellis-train[mlflow]`): http(s)://server, sqlite:///runs/mlflow.db, ...
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "trellis"
    # The run's name in W&B and MLflow ("" = theirs).
    run_name: str = ""


@dataclass(kw_only=True)
class LauncherConfig:
    name: Literal["auto", "standalone", "torchrun", "deepspeed", "mpirun", "srun"] = "auto"
    # Ranks per node when trellis starts its own ranks; 0 = dp × pp × tp (with -1 read as 1).
    nproc_per_node: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port
    hostfile: str = ""
    # Self-spawned ranks: after a forwarded SIGTERM/SIGINT/SIGHUP/SIGUSR1, how long the parent waits for the
    # ranks' final save before it kills them (exit code 1).
    stop_timeout_s: float = 300.0


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # Where the config came from (file path), for messages; not a user key.
    source: str = field(default="", repr=False, compare=False)
