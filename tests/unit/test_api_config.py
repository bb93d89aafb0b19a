"""`import trellis` stays cheap: the Python API is loaded on first use (trellis/__init__.py's __getattr__)."""

from __future__ import annotations

import subprocess
import sys


def test_import_trellis_does_not_import_torch():
    code = ("import sys, trellis; assert 'torch' not in sys.modules, 'import trellis pulled in torch'; "
            "trellis.load_config; assert 'torch' in sys.modules; print(trellis.load_config.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "trellis.engine.api"


def test_load_config_from_preset_dict_and_trainconfig_with_cli_errors():
    import pytest

    import trellis
    from trellis.errors import ConfigError

    cfg = trellis.load_config("tiny-llama", ["--parallel.tp=2", "--peft.method=lora"])
    assert cfg.parallel.tp == 2 and cfg.peft.method == "lora"
    again = trellis.load_config(cfg, ["--train.lr=1e-3"])
    assert again.parallel.tp == 2 and again.train.lr == 1e-3
    assert trellis.load_config({"train": {"steps": 7}}).train.steps == 7
    with pytest.raises(ConfigError, match="train.lrr: unknown key; did you mean 'train.lr'"):
        trellis.load_config({"train": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="train.objective='dpo' needs preference pairs: set data.type"):
        trellis.load_config("tiny-llama", ["--train.objective=dpo", "--peft.method=lora"])


def test_meta_model_is_materialised_with_build_models_init():
    import torch
    from transformers import AutoModelForCausalLM

    import trellis
    from trellis.engine.api import prepare_user_model
    from trellis.engine.model import build_model, load_hf_config

    cfg = trellis.load_config("tiny-llama")
    ref, _ = build_model(cfg.model, seed=cfg.train.seed)
    _, hf = load_hf_config(cfg.model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf)
    got, _ = prepare_user_model(meta, seed=cfg.train.seed, device=torch.device("cpu"))
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    assert got.training and not got.config.use_cache
