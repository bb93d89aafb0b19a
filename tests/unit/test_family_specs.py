"""Per-family specs are data: every path they name exists on the real HF model, the TP plan pairs
column- with row-parallel layers, fused QKV layouts keep whole heads under contiguous sharding, and the
GPT-2 Conv1D surgery is exactly invertible for export. No processes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.distributed.test_tensor_parallel import HIDDEN, SEQ, VOCAB, tiny_model
from trellis.parallel.hf_surgery import prepare_model, to_hf_state_dict
from trellis.parallel.models import FAMILIES, family_for
from trellis.parallel.tensor_parallel import _alibi_local_heads_hook

FAMILY_NAMES = ["llama", "gpt2", "opt", "bloom", "gpt_neox", "qwen3", "phi3", "gemma2"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def prepared(request):
    model = tiny_model(request.param)
    prepare_model(model, family_for(request.param))
    return request.param, model


def test_every_family_has_a_spec_and_model_types_are_unique():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert {family_for(n).name for n in FAMILY_NAMES} == set(FAMILY_NAMES)
    assert family_for("mistral").name == family_for("qwen2").name == "llama"


def test_spec_paths_exist_on_the_hf_model(prepared):
    name, model = prepared
    spec = family_for(name)
    for path in (spec.backbone, spec.layers, spec.embed_tokens, spec.final_norm, spec.lm_head, spec.position_embedding,
                 spec.embed_norm, spec.rotary_emb):
        if path is not None:
            model.get_submodule(path)  # raises AttributeError if the spec is wrong
    assert isinstance(model.get_submodule(spec.embed_tokens), nn.Embedding)
    for block in model.get_submodule(spec.layers):
        block.get_submodule(spec.attention)
        for path in list(spec.tp_plan) + list(spec.sp_plan):
            block.get_submodule(path)
        leaf_names = {n.rsplit(".", 1)[-1] for n, _ in block.named_modules()}
        dotted = {n for n, _ in block.named_modules()}
        for t in spec.default_lora_targets:
            assert t in leaf_names or any(d.endswith(t) for d in dotted), (name, t)


def test_tp_plan_pairs_column_with_row_parallel(prepared):
    """Megatron pairing: the row-parallel layers are exactly the ones writing back into the residual stream
    (out = hidden), and every column-parallel output width is what some row-parallel layer consumes."""
    name, model = prepared
    spec = family_for(name)
    block = model.get_submodule(spec.layers)[0]
    hidden = model.config.hidden_size
    rows = [block.get_submodule(p) for p, k in spec.tp_plan.items() if k == "rowwise"]
    cols = [block.get_submodule(p) for p, k in spec.tp_plan.items() if k != "rowwise"]
    assert len(rows) == 2 and all(isinstance(m, nn.Linear) and m.out_features == hidden for m in rows)
    assert all(isinstance(m, nn.Linear) and m.in_features == hidden for m in cols)
    for m in rows:  # fed by a column-parallel layer (a fused QKV produces 3x the attention width)
        assert any(c.out_features in (m.in_features, 3 * m.in_features) for c in cols), (name, m)
    # every Linear in the block is in the plan: nothing large is silently left replicated
    planned = set(spec.tp_plan)
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert linears == planned, (name, linears ^ planned)


@pytest.mark.parametrize("name", ["bloom", "gpt_neox"])
def test_head_major_fused_qkv_contiguous_shard_keeps_whole_heads(name):
    """Emulate tp=2 on one process: rank r's attention gets the contiguous r-th half of the fused QKV rows
    and local head counts; its pre-projection context must equal heads [r*2, r*2+2) of the full module."""
    model = tiny_model(name)
    spec = family_for(name)
    attn = model.get_submodule(spec.layers)[0].get_submodule(spec.attention)
    seen = {}
    attn.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    attn.dense.register_forward_pre_hook(lambda m, a: seen.update(full=a[0].detach()))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    n_heads, tp = model.config.num_attention_heads, 2
    width = HIDDEN // tp
    for r in range(tp):
        local = copy.deepcopy(attn)
        local._forward_pre_hooks.clear()
        rows = slice(r * 3 * width, (r + 1) * 3 * width)
        local.query_key_value = nn.Linear(HIDDEN, 3 * width)
        with torch.no_grad():
            local.query_key_value.weight.copy_(attn.query_key_value.weight[rows])
            local.query_key_value.bias.copy_(attn.query_key_value.bias[rows])
        for a in ("num_heads", "hidden_size", "split_size"):
            if isinstance(getattr(local, a, None), int):
                setattr(local, a, getattr(local, a) // tp)
        got = {}
        local.dense = nn.Linear(width, HIDDEN)
        local.dense.register_forward_pre_hook(lambda m, a: got.update(ctx=a[0].detach()))
        if spec.alibi:
            local.register_forward_pre_hook(_alibi_local_heads_hook(r, tp, n_heads), with_kwargs=True)
        with torch.no_grad():
            local(*seen["args"], **seen["kwargs"])
        torch.testing.assert_close(got["ctx"], seen["full"][..., r * width:(r + 1) * width], rtol=0, atol=1e-6)


def test_gpt2_conv1d_surgery_keeps_logits_and_exports_back_exactly():
    ref = tiny_model("gpt2")
    model = copy.deepcopy(ref)
    prepare_model(model, family_for("gpt2"))
    prepare_model(model, family_for("gpt2"))  # idempotent
    from transformers.pytorch_utils import Conv1D

    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert isinstance(model.transformer.h[0].attn.c_attn.q, nn.Linear)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    exported = to_hf_state_dict(model.state_dict(), "gpt2")
    expected = ref.state_dict()
    assert exported.keys() == expected.keys()
    for k, v in expected.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k], v), k


def test_phi3_fused_projections_unfuse_keep_logits_and_export_back_exactly():
    """qkv_proj = [q | k | v] (GQA: k, v narrower than q) and gate_up_proj = [gate | up] become one Linear per
    part; logits are unchanged, the attention slices its fused output with its own (localizable) head count,
    and to_hf_state_dict concatenates the parts back into HF's tensors bit for bit."""
    ref = tiny_model("phi3")
    model = copy.deepcopy(ref)
    prepare_model(model, family_for("phi3"))
    prepare_model(model, family_for("phi3"))  # idempotent
    attn = model.model.layers[0].self_attn
    assert [attn.qkv_proj.q.out_features, attn.qkv_proj.k.out_features, attn.qkv_proj.v.out_features] == [64, 32, 32]
    assert attn.config.num_attention_heads == attn.num_heads == 4 and model.config.num_attention_heads == 4
    attn.num_heads = 2  # what tensor parallel's head localization does on tp=2; the model config stays global
    assert attn.config.num_attention_heads == 2 and model.config.num_attention_heads == 4
    attn.num_heads = 4
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the same dot products, as one fused matmul or three: equal up to the kernel's summation order, which
        # depends on the CPU's vector width (AVX2 measured 8.9e-8 on O(1) logits; AVX-512 0): a few fp32 ulps
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-6)
    exported = to_hf_state_dict(model.state_dict(), "phi3")
    expected = ref.state_dict()
    assert exported.keys() == expected.keys()
    for k, v in expected.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k], v), k


@pytest.mark.parametrize("model_type,extra,seq,needle", [
    ("gemma2", {"sliding_window": 32}, 64, "data.seq_len=64 exceeds the model's sliding_window=32"),
    ("phi3", {"sliding_window": 32}, 64, "data.seq_len=64 exceeds the model's sliding_window=32"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 0}, 64, "sliding_window=32"),
    ("phi3", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, 16, "rope_scaling type 'yarn' is not supported"),
])
def test_family_config_limits_are_one_line_errors(model_type, extra, seq, needle):
    """A window shorter than data.seq_len (trellis' masks are exact only within it) and unsupported RoPE types
    are refused by name with the fix; the same configs within the window pass."""
    from types import SimpleNamespace

    from trellis.engine.model import check_family_config
    from trellis.errors import ConfigError

    # a config object as transformers' would read it (Phi3Config itself rejects yarn before trellis sees it)
    cfg = SimpleNamespace(model_type=model_type, layer_types=None, **extra)
    if model_type == "qwen3":
        cfg.layer_types = ["sliding_attention"] * 2
    with pytest.raises(ConfigError) as e:
        check_family_config(cfg, seq)
    assert needle in str(e.value) and "\n" not in str(e.value)
    if "sliding_window" in extra:
        check_family_config(cfg, extra["sliding_window"])  # within the window: accepted
