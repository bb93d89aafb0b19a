"""Malformed configs: each gives an error naming the field, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trellis import configs
from trellis.cli import main
from trellis.errors import ConfigError

# (override or TOML text, the field the message must name)
BAD_OVERRIDES = [
    ("--train.lre=1e-3", "train.lre"),
    ("--precison.dtype=bf16", "precison.dtype"),
    ("--precision.dtype=fp8", "precision.dtype"),
    ("--train.micro_batch_size=0", "train.micro_batch_size"),
    ("--train.grad_accum=-1", "train.grad_accum"),
    ("--train.lr=-1", "train.lr"),
    ("--train.steps=abc", "train.steps"),
    ("--parallel.tp=0", "parallel.tp"),
    ("--parallel.dp=-2", "parallel.dp"),
    ("--train.global_batch_size=7", "train.global_batch_size"),
    ("--zero.stage=4", "zero.stage"),
    ("--zero.offload_param=cpu", "zero.offload_param"),
    ("--zero.offload_optimizer=nvme", "zero.offload_"),
    ("--precision.loss_scale=banana", "precision.loss_scale"),
    ("--train.objective=dpo --peft.method=lora", "data.type"),
    ("--train.objective=dpo --data.type=preference --peft.method=prompt", "peft.method"),
    ("--activation_checkpointing.mode=partial", "activation_checkpointing.mode"),
    ("--checkpoint.interval=10", "checkpoint.interval"),
    ("--data.seq_len=1", "data.seq_len"),
    ("--parallel.pp_split=3,1", "parallel.pp_split"),
    ("--parallel.sequence_parallel=true", "parallel.sequence_parallel"),  # tp=1 in the preset
    ("--train.grad_clip=-1", "train.grad_clip"),
    ("--logging.log_interval=0", "logging.log_interval"),
    ("--train.beta2=1.5", "train.beta1/beta2"),
    ("--checkpoint.resume=auto", "checkpoint.resume"),
    ("--checkpoint.resume=/nonexistent/step-5 --checkpoint.dir=runs/x", "no such checkpoint directory"),
    ("--checkpoint.resume=configs", "needs checkpoint.dir"),  # an existing dir, but nowhere to save
    ("--checkpoint.resume_allow_change=parallel.dp", "not a trajectory field"),  # layouts change freely anyway
    ("--checkpoint.on_save_error=retry", "checkpoint.on_save_error"),
    ("--launcher.master_port=70000", "launcher.master_port"),
    ("--zero.backend=deepspeed --parallel.tp=2", "zero.backend"),
    ("--peft.method=lora --peft.quantize_base=int8 --parallel.dp=1 --parallel.tp=2", "peft.quantize_base='int8' with parallel.tp=2"),
    ("--peft.method=lora --peft.quantize_base=int8 --zero.backend=deepspeed", "peft.quantize_base='int8' needs zero.backend='native'"),
    # context parallel
    ("--parallel.cp=0", "parallel.cp=0"),
    ("--parallel.cp=3", "data.seq_len=128 must be divisible by parallel.cp=3"),
    ("--parallel.cp=2 --parallel.tp=2 --parallel.sequence_parallel=true --data.seq_len=130",
     "divisible by parallel.cp x parallel.tp = 4"),
    ("--parallel.cp=2 --zero.backend=deepspeed", "parallel.cp=2 with zero.backend='deepspeed'"),
    ("--parallel.cp=2 --peft.method=prefix", "parallel.cp=2 with peft.method='prefix'"),
    ("--parallel.cp=2 --train.compile=true", "parallel.cp=2 with train.compile=true"),
]


@pytest.mark.parametrize("override,field", BAD_OVERRIDES)
def test_bad_override_names_field_and_exits_2(override, field, capsys):
    rc = main(["config", "show", "configs/tiny-llama.toml", *override.split()])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert field in err, err
    assert "Traceback" not in err
    assert all(line.startswith("error: ") for line in err.strip().splitlines()), err


def test_malformed_configs_hit_distinct_rules():
    """The tables above exercise over twenty different rules: every entry fails with a message of its own (two
    entries with the same message would test one rule twice)."""
    def first_error(**kw) -> str:
        with pytest.raises(ConfigError) as e:
            configs.load(**kw)
        return e.value.messages[0]

    msgs = [first_error(path="configs/tiny-llama.toml", overrides=o.split()) for o, _ in BAD_OVERRIDES]
    assert len(set(msgs)) == len(msgs) >= 20, msgs
    assert all(field in m for m, (_, field) in zip(msgs, BAD_OVERRIDES)), msgs


@pytest.mark.parametrize("old,new", [("train.gradient_accumulation_steps", "train.grad_accum"),
                                     ("peft.lora_r", "peft.r"), ("train.max_steps", "train.steps")])
def test_renamed_key_names_its_replacement(old, new):
    from trellis.configs.loader import RENAMED_KEYS

    with pytest.raises(ConfigError) as e:
        configs.load("tiny-llama", [f"--{old}=2"])
    assert f"{old}: not a trellis key" in e.value.messages[0] and new in e.value.messages[0]
    # the table names real keys only, and none of its old names is (still) a key
    keys = set(configs.all_keys())
    assert not set(RENAMED_KEYS) & keys
    for hint in RENAMED_KEYS.values():
        assert any(k in keys for k in hint.replace(",", " ").split()), hint


def test_renamed_key_in_a_toml_file(tmp_path):
    f = tmp_path / "old.toml"
    f.write_text("[train]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="train.learning_rate: not a trellis key.*use train.lr"):
        configs.load(str(f))


BAD_TOML = [
    ("[train]\nlr = 'fast'\n", "train.lr"),
    ("[trian]\nlr = 1e-3\n", "trian"),
    ("[train\nlr = 1\n", "not valid TOML"),
    ("train = 3\n", "train: must be a table"),
    ("[peft]\nmethod = 'lokr'\nquantize_base = 'nf4'\n", "peft.method"),
    ("[peft]\nquantize_base = 'nf4'\n", "peft.quantize_base"),
    ("[precision]\ndtype = 'fp16'\nmin_loss_scale = 1e9\n", "precision.min_loss_scale"),
    ("[parallel]\npp = 4\n[train]\ngrad_accum = 2\n", "train.grad_accum"),
    ("[parallel]\ndp = -1\ntp = -1\n", "only one of dp, pp, tp"),
    ("[zero]\nstage = 2\noffload_optimizer = 'cpu'\n", "zero.offload_optimizer"),
]


@pytest.mark.parametrize("text,field", BAD_TOML)
def test_bad_toml_names_field(tmp_path, text, field, capsys):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    rc = main(["config", "show", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and field in err, err


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        configs.load("tiny-llama", ["--train.lre=1", "--precison.dtype=bf16", "--zero.stage=9"])
    assert len(e.value.messages) == 3


def test_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'train.micro_batch_size'"):
        configs.load("tiny-llama", ["--train.micro_batchsize=2"])


def test_unknown_preset_suggests_close_match():
    with pytest.raises(ConfigError, match="tiny-llama"):
        configs.load("tiny-lama")


def test_overrides_and_types():
    cfg = configs.load("tiny-llama", ["--train.micro_batch_size=3", "--precision.dtype", "bf16", "--zero.stage=2",
                                      "--peft.target_modules=q_proj,v_proj"])
    assert cfg.train.micro_batch_size == 3 and cfg.precision.dtype == "bf16" and cfg.zero.stage == 2
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]


def test_cli_surface_is_frozen():
    """Renaming a key breaks users' configs: this list changes only on purpose."""
    keys = set(configs.all_keys())
    contract = {"parallel.dp", "parallel.tp", "parallel.pp", "zero.stage", "zero.backend", "zero.offload_optimizer",
                "zero.offload_param", "precision.dtype", "train.micro_batch_size", "train.grad_accum", "train.steps",
                "train.lr", "train.seed", "activation_checkpointing.mode", "peft.method", "checkpoint.dir",
                "checkpoint.interval", "logging.metrics_file"}
    assert contract <= keys


def test_subprocess_error_has_no_traceback(repo):
    p = subprocess.run([sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", "--parallel.tp=0"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "parallel.tp" in p.stderr and "Traceback" not in p.stderr


DS_OK = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
    "gradient_clipping": 0.5,
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True},
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 100,
             "hysteresis": 3, "min_loss_scale": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-7, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5, "total_num_steps": 50}},
}


def test_deepspeed_json_maps_onto_schema(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(DS_OK))
    cfg = configs.load("tiny-llama", deepspeed_json=str(f))
    assert cfg.zero.backend == "deepspeed" and cfg.zero.stage == 2 and cfg.zero.offload_optimizer == "cpu"
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.global_batch_size) == (4, 2, 16)
    assert cfg.precision.dtype == "fp16" and cfg.precision.loss_scale == "dynamic"
    assert (cfg.precision.initial_scale_power, cfg.precision.loss_scale_window, cfg.precision.hysteresis,
            cfg.precision.min_loss_scale) == (12, 100, 3, 2.0)
    assert (cfg.train.lr, cfg.train.beta2, cfg.train.eps, cfg.train.weight_decay) == (1e-3, 0.99, 1e-7, 0.1)
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps, cfg.train.grad_clip) == ("cosine", 5, 50, 0.5)


@pytest.mark.parametrize("extra,field", [
    ({"pipeline": {"stages": 2}}, "pipeline"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}, "fp16.fp16_master_weights_and_grads"),
    ({"train_batch_size": 10}, "train.global_batch_size"),
])
def test_deepspeed_json_field_it_cannot_honour_is_an_error(tmp_path, extra, field):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({**DS_OK, **extra}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        configs.load("tiny-llama", deepspeed_json=str(f))
