"""DeepSpeed JSONs as people have them, written here as literals: a fine-tuning tutorial's ZeRO-2 JSON, the
transformers docs' ZeRO-3 JSON with "auto", and DeepSpeed-Chat's (get_train_ds_config: `bfloat16`, a disabled
`hybrid_engine` and `tensorboard`). Each is accepted by `configs.load` and by the DeepSpeed backend's pre-flight
(DeepSpeed's own config model, in this process, no ranks); the batch fields layer TOML < JSON < CLI; a field
DeepSpeed's model rejects is one line, exit 2, from the parent before any rank starts."""

from __future__ import annotations

import json

import pytest

from trellis import configs
from trellis.engine.backends import deepspeed_config as dsb
from trellis.engine.optim import lr_at
from trellis.errors import ConfigError

# A fine-tuning tutorial's ds_config_zero2.json (concrete values; its lr 2e-5 is far below the preset's 3e-3).
TUTORIAL_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-5,
                                                      "warmup_num_steps": 10, "total_num_steps": 100}},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                          "contiguous_gradients": True},
    "gradient_clipping": 1.0,
    "train_batch_size": 16,
    "train_micro_batch_size_per_gpu": 2,
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
}

# transformers' docs (DeepSpeed integration), ZeRO-3 with CPU offload, every trainer-owned value "auto".
HF_DOCS_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}

# DeepSpeed-Chat's get_train_ds_config(offload=False, dtype="bf16", stage=2, enable_hybrid_engine=False, ...).
DS_CHAT = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 4,
    "steps_per_print": 10,
    "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_param": {"device": "none"},
                          "offload_optimizer": {"device": "none"}, "stage3_param_persistence_threshold": 1e4,
                          "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
                          "memory_efficient_linear": False},
    "bfloat16": {"enabled": True},
    "gradient_clipping": 1.0,
    "prescale_gradients": False,
    "wall_clock_breakdown": False,
    "hybrid_engine": {"enabled": False, "max_out_tokens": 512, "inference_tp_size": 1,
                      "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8},
    "tensorboard": {"enabled": False, "output_path": "step1_tensorboard/ds_tensorboard_logs/",
                    "job_name": "step1_model_tensorboard"},
}


def _load(tmp_path, ds: dict, overrides: dict | None = None):
    f = tmp_path / "ds_config.json"
    f.write_text(json.dumps(ds))
    return configs.load("tiny-llama", overrides or {}, deepspeed_json=str(f))  # the preset: dp=2, grad_accum=2


def test_tutorial_zero2_json_is_accepted_and_its_train_batch_size_overrides_the_tomls_grad_accum(tmp_path):
    cfg = _load(tmp_path, TUTORIAL_ZERO2)
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum, t.global_batch_size) == (2, 4, 16)  # 16 = 2 x 4 x dp 2
    assert t.lr == 2e-5 and t.schedule == "linear" and t.warmup_steps == 10 and t.steps == 100
    assert lr_at(t.steps - 1, t) == pytest.approx(2e-6 + (2e-5 - 2e-6) / 90)  # the preset's floor: lr / 10
    ds = dsb.preflight_ds_config(cfg)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 4)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2e8
    # CLI > JSON: a command-line grad_accum re-derives the JSON's global batch instead of contradicting it ...
    cli = _load(tmp_path, TUTORIAL_ZERO2, {"train.grad_accum": 1})
    assert (cli.train.grad_accum, cli.train.global_batch_size) == (1, 0)
    assert dsb.preflight_ds_config(cli)["train_batch_size"] == 4
    # ... and a command-line micro batch keeps the JSON's global batch (over the TOML's grad_accum)
    cli = _load(tmp_path, TUTORIAL_ZERO2, {"train.micro_batch_size": 1})
    assert (cli.train.micro_batch_size, cli.train.grad_accum, cli.train.global_batch_size) == (1, 8, 16)


def test_transformers_docs_zero3_auto_json_is_accepted_unchanged(tmp_path):
    cfg = _load(tmp_path, HF_DOCS_ZERO3)
    assert cfg.zero.stage == 3 and cfg.zero.offload_optimizer == "cpu" and cfg.zero.offload_param == "cpu"
    toml = configs.load("tiny-llama").train
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (toml.micro_batch_size, toml.grad_accum)  # "auto"
    ds = dsb.preflight_ds_config(cfg)
    assert ds["train_batch_size"] == toml.micro_batch_size * toml.grad_accum * 2
    assert ds["zero_optimization"]["stage"] == 3


def test_deepspeed_chat_json_with_bfloat16_and_a_disabled_hybrid_engine_is_accepted(tmp_path):
    cfg = _load(tmp_path, DS_CHAT)
    assert cfg.precision.dtype == "bf16" and cfg.zero.stage == 2
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (4, 4)  # 32 = 4 x 4 x dp 2
    ds = dsb.preflight_ds_config(cfg)
    assert ds["bf16"] == {"enabled": True} and "bfloat16" not in ds


def test_field_errors_name_the_field_and_talk_about_tp_pp_only_for_parallel_fields(tmp_path):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, {**DS_CHAT, "hybrid_engine": {"enabled": True}})
    (msg,) = e.value.messages
    assert "'hybrid_engine'" in msg and "tp" not in msg.replace("output", "") and '"enabled": false' in msg
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, {**DS_CHAT, "pipeline": {"stages": 2}})
    assert "parallel.pp" in e.value.messages[0]
    # a tuning knob trellis passes through, refused by DeepSpeed's own model: named by its path, in the parent
    bad = {**TUTORIAL_ZERO2, "zero_optimization": {**TUTORIAL_ZERO2["zero_optimization"], "overlap_comm": "often"}}
    with pytest.raises(ConfigError) as e:
        dsb.preflight_ds_config(_load(tmp_path, bad))
    assert len(e.value.messages) == 1 and "zero_optimization.overlap_comm" in e.value.messages[0]


def test_a_field_deepspeed_rejects_is_one_line_exit_2_before_any_rank_starts(tmp_path, capsys):
    """`trellis train` through the real CLI entry, in this process (the parent): it would spawn 2 ranks if the
    pre-flight let the config through."""
    from trellis import cli

    bad = {**TUTORIAL_ZERO2, "zero_optimization": {**TUTORIAL_ZERO2["zero_optimization"], "overlap_comm": "often"}}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(bad))
    rc = cli.main(["train", "tiny-llama", "--deepspeed", str(f), f"--logging.metrics_file={tmp_path / 'm.jsonl'}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and "zero_optimization.overlap_comm" in errors[0], err[-2000:]
    assert not (tmp_path / "m.jsonl").exists()  # no rank trained
