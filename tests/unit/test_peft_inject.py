"""PEFT injection, 4-bit base quantization and export errors, in one process (no process group)."""

from __future__ import annotations

import pytest
import torch

from trellis import configs
from trellis.errors import ConfigError
from trellis.parallel.models import family_for

SPEC = family_for("llama")


def _cfg(**ov):
    return configs.load("tiny-llama", {"parallel.dp": 1, **ov})


def _model(cfg):
    from trellis.engine.model import build_model

    return build_model(cfg.model, seed=cfg.train.seed)[0]


@pytest.mark.parametrize("method,cls", [("lora", "LoraConfig"), ("rslora", "LoraConfig"), ("dora", "LoraConfig"),
                                        ("qlora", "LoraConfig"), ("ia3", "IA3Config"), ("adalora", "AdaLoraConfig"),
                                        ("lokr", "LoKrConfig"), ("loha", "LoHaConfig"), ("hra", "HRAConfig")])
def test_peft_config_per_method(method, cls):
    from trellis.engine.peft.inject import build_peft_config

    pc = build_peft_config(_cfg(**{"peft.method": method}), SPEC, 10)
    assert type(pc).__name__ == cls
    assert set(pc.target_modules) == set(SPEC.default_lora_targets)
    if method in ("rslora", "dora"):
        assert getattr(pc, "use_" + method)


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"])
@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_per_layer_prefixes_under_two_virtual_stages_are_a_clear_config_error(method, schedule):
    from trellis.engine.peft.inject import make_injector

    cfg = _cfg(**{"peft.method": method, "parallel.pp": 2, "parallel.pp_schedule": schedule})
    with pytest.raises(ConfigError, match=f"peft.method='{method}' with parallel.pp_schedule='{schedule}'.*"
                                          "use parallel.pp_schedule='1f1b'"):
        make_injector(cfg)(_model(cfg), SPEC)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bloom", "neox"])
@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_prefix_pipeline_stages_compose_to_the_whole_model(family, method):
    """Two pipeline stage modules run one after the other (in one process) give the in-place model's logits
    (which equal peft's, test above), and the two encoder replicas' gradients add up to the whole model's:
    positions offset by the prefix, the [seq, prefix + seq] mask, each stage's global layer indices."""
    import copy

    from trellis.parallel.hf_surgery import prepare_model
    from trellis.parallel.pipeline import build_stage_module, split_layers

    from trellis.engine.peft.inject import make_injector

    cfg = _cfg(**{"model.path": f"tiny-{family}", "peft.method": method, "peft.num_virtual_tokens": 4})
    full = _model(cfg)
    spec = family_for(full.config.model_type)
    prepare_model(full, spec)
    hooks = make_injector(cfg)(full, spec)  # the PromptHooks parallelize() hands to the stages
    ids = torch.randint(0, full.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    want = full(input_ids=ids).logits
    want.square().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in full.named_parameters() if p.requires_grad}
    full.zero_grad(set_to_none=True)
    ranges = split_layers(len(full.get_submodule(spec.layers)), 2, "even")
    stages = [build_stage_module(copy.deepcopy(full), spec, i, 2, ranges[i], hooks) for i in range(2)]
    h = stages[0](ids)
    h_in = h.detach().requires_grad_()
    got = stages[1](h_in)
    got.square().sum().backward()
    h.backward(h_in.grad)
    assert torch.equal(got, want)
    for name, g in want_grads.items():
        parts = [dict(s.named_parameters())[name].grad for s in stages]
        assert all(x is not None and x.abs().max() > 0 for x in parts), f"{name}: a stage's replica got no gradient"
        torch.testing.assert_close(parts[0] + parts[1], g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_under_pipeline_parallel_pass_the_layout_check(method):
    from trellis.engine.peft.prompt import check_layout

    check_layout(_cfg(**{"peft.method": method, "parallel.pp": 2}))  # proven on real ranks (test_peft_prompt_pp)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        check_layout(_cfg(**{"peft.method": method, "parallel.tp": 2, "parallel.sequence_parallel": True}))


FAMILIES = ["llama", "gpt2", "opt", "bloom", "neox"]


def _prompt_pair(family: str, method: str):
    """(our model with the prompt module attached in place, peft's wrapper of the same base), same seed."""
    from peft import get_peft_model

    from trellis.engine.peft.inject import adapter_seed, make_injector
    from trellis.engine.peft.prompt import prompt_config
    from trellis.parallel.hf_surgery import prepare_model

    cfg = _cfg(**{"model.path": f"tiny-{family}", "peft.method": method, "peft.num_virtual_tokens": 4})
    ours = _model(cfg)
    spec = family_for(ours.config.model_type)
    prepare_model(ours, spec)  # every layout does (GPT-2: Conv1D -> Linear, c_attn unfused)
    make_injector(cfg)(ours, spec)
    assert [n for n, p in ours.named_parameters() if p.requires_grad][0] == "peft_prompt.embedding.weight"
    base = _model(cfg)
    torch.manual_seed(adapter_seed(cfg))
    return ours, get_peft_model(base, prompt_config(cfg, base.config)), spec


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_in_place_prefix_tuning_equals_peft_wrapper(family, method):
    """Same seed -> same prefix encoder; the stack hook's prefix cache gives peft's logits."""
    ours, ref, _ = _prompt_pair(family, method)
    ids = torch.randint(0, ours.config.vocab_size, (2, 8))
    got, want = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # GPT-2's unfused c_attn reassociates
    assert got.shape[1] == 8
    with torch.no_grad():
        plain = ref.get_base_model()(input_ids=ids).logits
    assert (plain - want).abs().max().item() > 1e-4  # the prefix changes the outputs


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_prefix_cache_is_read_only_under_activation_checkpointing(family):
    """Full activation checkpointing recomputes every block with the same prefix cache: gradients equal the
    run without it (a cache that appended on update() would hand the recomputation its own keys twice)."""
    from trellis.parallel.activation_checkpoint import apply_activation_checkpointing

    ours, _, spec = _prompt_pair(family, "ptuning_v2")
    ids = torch.randint(0, ours.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for ac in (False, True):
        if ac:
            apply_activation_checkpointing(list(ours.get_submodule(spec.layers)), spec, "full")
        ours.train()
        ours(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad})
        ours.zero_grad(set_to_none=True)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_in_place_prompt_learning_equals_peft_wrapper(family, method):
    """Same seed -> same virtual tokens; our hooks give peft's logits (without the virtual positions)."""
    ours, ref, _ = _prompt_pair(family, method)
    ids = torch.randint(0, ours.config.vocab_size, (2, 8))
    got, want = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    assert want.shape[1] == 12 and got.shape[1] == 8
    torch.testing.assert_close(got, want[:, 4:], rtol=0, atol=1e-6)


def test_only_adapters_trainable_and_init_independent_of_prior_rng():
    from trellis.engine.peft.inject import make_injector

    cfg = _cfg(**{"peft.method": "dora", "peft.r": 4})
    states = []
    for prior_draws in (0, 123):
        model = _model(cfg)
        torch.rand(prior_draws)  # whatever ran before injection must not change the adapters
        make_injector(cfg)(model, SPEC)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(("lora_" in n) for n in trainable), list(trainable)[:3]
        assert any("lora_magnitude_vector" in n for n in trainable)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
        states.append(trainable)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unmatched_targets_are_a_config_error():
    from trellis.engine.peft.inject import make_injector

    cfg = _cfg(**{"peft.method": "lora", "peft.target_modules": ["no_such_proj"]})
    with pytest.raises(Exception, match="no_such_proj"):
        make_injector(cfg)(_model(cfg), SPEC)


def test_qlora_quantizes_block_linears_only():
    from trellis.engine.peft.inject import make_injector
    from trellis.parallel.quant4bit import dequantized_weight

    cfg = _cfg(**{"peft.method": "qlora", "peft.r": 4})
    model = _model(cfg)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_injector(cfg)(model, SPEC)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear4bit" and q.base_layer.weight.dtype == torch.uint8
    assert q.base_layer.weight.quant_state.nested  # double quantization
    err = (dequantized_weight(q.base_layer) - ref["model.layers.0.self_attn.q_proj.weight"]).abs().max().item()
    assert 0 < err < 0.05  # NF4 of N(0, 0.02) weights: lossy, but close
    assert model.lm_head.weight.dtype == torch.float32  # head and embeddings stay full precision
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    model(input_ids=x).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_qlora_with_fsdp_stage_quantizes_the_base():
    """ZeRO-3 no longer refuses a 4-bit base (FSDP2 leaves the packed weights whole, see
    parallel/data_parallel.apply_fsdp; numerics in tests/distributed/test_peft_layouts.py dp2-qlora-z3):
    the injector quantizes every block linear and only adapters train."""
    from trellis.engine.peft.inject import make_injector

    cfg = _cfg(**{"peft.method": "qlora", "zero.stage": 3})
    model = _model(cfg)
    make_injector(cfg)(model, SPEC)
    packed = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert len(packed) == 7 * model.config.num_hidden_layers
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_export_cli_names_a_missing_checkpoint(tmp_path, capsys):
    from trellis.cli import main

    rc = main(["export", "adapter", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert rc == 2
    assert "neither a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("method,model,targets", [
    *[(m, "tiny-gpt2", t) for m in ("lora", "rslora") for t in ((), ("c_attn.q", "c_attn.v", "c_fc"))],
    ("rslora", "tiny-phi3", ()), ("lora", "tiny-phi3", ("qkv_proj.q", "qkv_proj.v", "gate_up_proj.up", "down_proj"))])
def test_unfused_lora_refuses_into_peft_format_exactly(method, model, targets):
    """trellis trains GPT-2 LoRA on unfused q/k/v Linears (Phi-3: qkv_proj.{q,k,v}, GQA-narrow k/v, and
    gate_up_proj.{gate,up}); export re-fuses each layer's part adapters into one adapter of HF's fused linear
    (rank m·r, block-diagonal B, alpha scaled to keep the scaling). peft's own model on the HF model with those
    tensors gives our logits. Non-trivial adapters: B drawn at random."""
    from peft import get_peft_model

    from trellis.engine.peft.export import refuse_lora
    from trellis.engine.peft.inject import build_peft_config, make_injector
    from trellis.parallel.hf_surgery import prepare_model

    cfg = _cfg(**{"model.path": model, "peft.method": method, "peft.r": 4, "peft.alpha": 8.0,
                  "peft.target_modules": list(targets)})
    ours = _model(cfg)
    spec = family_for(ours.config.model_type)
    prepare_model(ours, spec)
    make_injector(cfg)(ours, spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    pc = build_peft_config(cfg, spec, 1)
    fused = refuse_lora(state, pc, method == "rslora", spec, _model(cfg))
    parts = (".c_attn.q.", ".c_attn.k.", ".c_attn.v.", ".qkv_proj.q.", ".qkv_proj.k.", ".qkv_proj.v.",
             ".gate_up_proj.gate.", ".gate_up_proj.up.")
    assert not any(p in k for p in parts for k in fused)
    ref = get_peft_model(_model(cfg), pc)
    own = dict(ref.named_parameters())
    assert {n for n, p in own.items() if p.requires_grad} == {f"base_model.model.{k}" for k in fused}
    with torch.no_grad():
        for k, v in fused.items():
            own[f"base_model.model.{k}"].copy_(v)
    ids = torch.randint(0, ours.config.vocab_size, (2, 8), generator=g)
    with torch.no_grad():
        got, want, plain = ours(input_ids=ids).logits, ref(input_ids=ids).logits, _model(cfg)(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(want, got, rtol=0, atol=1e-5)
