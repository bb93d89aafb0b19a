"""DeepSpeed backend without processes: trellis config -> DeepSpeed config, a stock ds_config.json as the
base, the fp16-on-CPU refusal, and the op-build lock cleanup (real files, real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from trellis import configs
from trellis.engine.backends import deepspeed as dsb
from trellis.engine.backends import check_supported, ds_ops
from trellis.errors import ConfigError


def _cfg(**ov):
    return configs.load("tiny-llama", {"zero.backend": "deepspeed", **ov})


def test_zero_stage_batch_and_torch_adam_without_offload():
    cfg = _cfg(**{"zero.stage": 2, "parallel.dp": 2, "train.micro_batch_size": 3, "train.grad_accum": 4,
                  "train.grad_clip": 0.5, "train.beta2": 0.99, "train.weight_decay": 0.1})
    ds = dsb.build_ds_config(cfg, dp=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 24)
    assert ds["gradient_clipping"] == 0.5
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True
    assert opt["params"]["betas"] == [0.9, 0.99] and opt["params"]["weight_decay"] == 0.1
    assert "fp16" not in ds and "bf16" not in ds and "aio" not in ds


def test_offload_cpu_uses_deepspeed_cpu_adam_and_nvme_gets_paths_and_aio(tmp_path):
    cpu = dsb.build_ds_config(_cfg(**{"zero.stage": 2, "zero.offload_optimizer": "cpu", "zero.pin_memory": True}), 1)
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in cpu["optimizer"]["params"]  # DeepSpeedCPUAdam (cpu_adam op)
    nv = dsb.build_ds_config(_cfg(**{"zero.stage": 3, "zero.offload_optimizer": "nvme", "zero.offload_param": "nvme",
                                     "zero.nvme_path": str(tmp_path)}), 1)
    z = nv["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "nvme" and z["offload_param"]["device"] == "nvme"
    assert z["offload_optimizer"]["nvme_path"].startswith(str(tmp_path))
    assert z["offload_optimizer"]["nvme_path"] != z["offload_param"]["nvme_path"]
    assert "aio" in nv


def test_fp16_dynamic_and_static_scale_and_bf16():
    ds = dsb.build_ds_config(_cfg(**{"precision.dtype": "fp16", "precision.initial_scale_power": 8,
                                     "precision.loss_scale_window": 3, "precision.hysteresis": 5,
                                     "precision.min_loss_scale": 0.25}), 1)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 3,
                          "hysteresis": 5, "min_loss_scale": 0.25}
    static = dsb.build_ds_config(_cfg(**{"precision.dtype": "fp16", "precision.loss_scale": "1024"}), 1)
    assert static["fp16"]["loss_scale"] == 1024.0
    assert dsb.build_ds_config(_cfg(**{"precision.dtype": "bf16"}), 1)["bf16"] == {"enabled": True}


def test_stock_json_is_the_base_and_auto_is_filled_from_trellis(tmp_path):
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": 77},
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-3,
                                                         "warmup_min_lr": 0}},
            "steps_per_print": 7}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(user))
    cfg = configs.load("tiny-llama", {"parallel.dp": 2, "train.micro_batch_size": 2, "train.grad_accum": 3,
                                      "train.beta1": 0.8}, deepspeed_json=str(path))
    ds = dsb.build_ds_config(cfg, dp=2)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True and z["stage3_param_persistence_threshold"] == 77
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 and ds["steps_per_print"] == 7
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["betas"][0] == 0.8
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert "scheduler" not in ds  # the Trainer owns the LR schedule (mapped onto train.* by configs)
    assert cfg.train.warmup_steps == 5


def test_stock_json_contradicting_the_trellis_batch_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                "train_batch_size": 64}))
    # parallel.dp=-1: the config layer cannot check the batch triple; the backend does, with the real dp.
    cfg = configs.load("tiny-llama", {"parallel.dp": -1}, deepspeed_json=str(path))
    with pytest.raises(ConfigError) as e:
        dsb.build_ds_config(cfg, dp=2)
    assert any("train_batch_size=64" in m and "'auto'" in m for m in e.value.messages)


def test_fp16_refused_with_fix_when_the_machine_lacks_fp16(monkeypatch):
    """Our message only: the support check is forced to False here; the next test checks it against DeepSpeed."""
    monkeypatch.setattr(dsb, "fp16_supported", lambda device_type: False)
    with pytest.raises(ConfigError) as e:
        dsb.check_precision_supported(_cfg(**{"precision.dtype": "fp16"}), "cpu")
    msg = e.value.messages[0]
    assert "precision.dtype='fp16'" in msg and "precision.dtype='bf16'" in msg and "zero.backend='native'" in msg
    dsb.check_precision_supported(_cfg(**{"precision.dtype": "bf16"}), "cpu")  # no error
    check_supported(configs.load("tiny-llama", {"precision.dtype": "fp16"}))  # native: fine
    with pytest.raises(ConfigError):  # the backend factory's check reaches DeepSpeed's
        check_supported(_cfg(**{"precision.dtype": "fp16"}))


def test_fp16_support_check_agrees_with_deepspeed_cpu_accelerator():
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        pytest.skip("this test compares with DeepSpeed's CPU accelerator")
    assert dsb.fp16_supported("cpu") == bool(acc.is_fp16_supported())


# ---- op build cache: stale locks ------------------------------------------------------------------
def _lock(root, name, age_s):
    d = root / name
    d.mkdir()
    lock = d / ds_ops.LOCK_NAME
    lock.touch()
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return d, lock


def test_stale_locks_removed_live_and_fresh_ones_kept(tmp_path):
    _, dead = _lock(tmp_path, "cpu_adam", age_s=600)           # builder gone: stale
    _, fresh = _lock(tmp_path, "async_io", age_s=5)            # a build that just started
    live_dir, live = _lock(tmp_path, "deepspeed_shm_comm", age_s=600)
    ancient_dir, ancient = _lock(tmp_path, "fused_adam", age_s=7200)
    # A real process building in the directory (as ninja does) holds the lock.
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=d)
             for d in (live_dir, ancient_dir)]
    try:
        time.sleep(0.2)
        removed = ds_ops.clean_stale_locks(tmp_path, stale_after_s=60, max_age_s=3600)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    assert set(removed) == {dead, ancient}
    assert not dead.exists() and not ancient.exists()
    assert fresh.exists() and live.exists()
    # Once its builder is gone the held lock is stale too.
    assert ds_ops.clean_stale_locks(tmp_path, stale_after_s=60) == [live]


def test_extensions_dir_is_project_local_and_respects_user_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    d = ds_ops.use_project_extensions_dir()
    assert d.name == ".torch_extensions" and (d.parent / "pyproject.toml").is_file()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(d)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert ds_ops.use_project_extensions_dir() == tmp_path / "mine"


def test_stock_json_contradicted_by_an_override_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = configs.load("tiny-llama", {"zero.stage": 3, "precision.dtype": "fp32"}, deepspeed_json=str(path))
    with pytest.raises(ConfigError) as e:
        dsb.build_ds_config(cfg, dp=1)
    msgs = " ".join(e.value.messages)
    assert "zero_optimization.stage=2 != zero.stage=3" in msgs and "enables bf16" in msgs
    ok = configs.load("tiny-llama", {}, deepspeed_json=str(path))
    assert dsb.build_ds_config(ok, dp=1)["zero_optimization"]["stage"] == 2


def test_fp16_probe_only_a_missing_op_means_unsupported(monkeypatch):
    """The CPU fp16 probe: a missing mkldnn op (AttributeError / RuntimeError) means 'no fp16'; any other
    exception is a real error and surfaces instead of turning into 'fp16 unsupported'."""
    import torch

    def raises(exc):
        def probe():
            raise exc
        return probe

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", raises(RuntimeError("op not built")))
    assert dsb.fp16_supported("cpu") is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", raises(ValueError("a bug in the probe")))
    with pytest.raises(ValueError, match="a bug in the probe"):
        dsb.fp16_supported("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", raises(AttributeError("no such op")))
    assert dsb.fp16_supported("cpu") is False
