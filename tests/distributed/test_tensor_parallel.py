"""Tensor parallel (DTensor) for every supported family.

Two levels, sharing ONE spawned process group per world size:
- module level (`apply_tensor_parallel` alone): each rank builds the same tiny HF model, keeps an unsharded
  deep copy as the reference, and compares loss, every gradient (gathered), one SGD step and a second
  forward; with and without sequence parallel; tied embeddings stay one parameter; per-rank bytes.
- engine level (Trainer with ZeRO/accumulation/checkpointing): 3 AdamW steps equal the 1-process HF
  reference (tests/distributed/reference.py).
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch

from trellis import configs
from trellis.errors import ConfigError
from trellis.parallel.hf_surgery import to_hf_state_dict

from .harness import run_ranks
from .reference import reference_run
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

TOL = 1e-5
VOCAB, HIDDEN, LAYERS, HEADS, SEQ, BATCH = 512, 64, 2, 4, 16, 2


# ---------------------------------------------------------------- module level (runs inside the ranks)

def tiny_model(family: str) -> torch.nn.Module:
    """fp32, dropout 0, sdpa where HF has it; the same weights on every rank (fixed seed)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, tie_word_embeddings=family in ("gpt2", "opt", "bloom", "gemma2"), use_cache=False)
    # GQA + explicit head_dim like the llama case; Gemma-2 with weights large enough (init 0.1) and caps small
    # enough that both tanh soft-caps bend the logits (a dropped cap moves the loss far beyond TOL)
    gqa = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=2, attention_dropout=0.0, pad_token_id=0)
    cfg = {
        # GQA: 4 query heads share 2 kv heads, so tp=2 leaves one kv head per rank
        "llama": lambda: tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, num_key_value_heads=2, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "opt": lambda: tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, word_embed_proj_dim=HIDDEN,
                                    num_attention_heads=HEADS, max_position_embeddings=64, dropout=0.0,
                                    attention_dropout=0.0, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0,
                                        attention_dropout=0.0, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, rotary_pct=0.25, hidden_dropout=0.0,
                                             attention_dropout=0.0, use_parallel_residual=True, **common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **gqa, **common),
        "phi3": lambda: tf.Phi3Config(resid_pdrop=0.0, embd_pdrop=0.0, **gqa, **common),
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, initializer_range=0.1,
                                          attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **gqa, **common),
    }[family]()
    torch.manual_seed(1234)
    # BLOOM has no sdpa path in transformers 5 (its ALiBi attention is hand-written: baddbmm + explicit mask);
    # Gemma-2's soft-capped attention logits neither (transformers refuses sdpa for it)
    attn = "eager" if family in ("bloom", "gemma2") else "sdpa"
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().train()


def _batch(dp_rank: int):
    g = torch.Generator().manual_seed(100 + dp_rank)  # each dp rank its own data
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100  # ignored positions must stay ignored under loss_parallel
    return ids[:, :-1], labels


def _loss(model, ids, labels, loss_parallel: bool):
    from trellis.parallel.loss import causal_lm_loss_sum, loss_parallel_context

    with loss_parallel_context(loss_parallel):
        loss_sum, n = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
        loss = loss_sum / n
        loss.backward()
    full = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
    return full.item(), n


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _hf_named(model, what: str, model_type: str) -> dict[str, torch.Tensor]:
    """Gathered params or grads, renamed/transposed back to the HF layout (exercises to_hf_state_dict)."""
    d = {n: _full(p if what == "param" else p.grad) for n, p in model.named_parameters()}
    return to_hf_state_dict(d, model_type)


def _max_delta(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _expected_local_numel(plain, spec, tp: int) -> int:
    """From the unsharded (surgery-applied) model and the plan: sharded weights hold 1/tp, column-parallel
    biases too; norms, row-parallel biases and position embeddings are replicated."""
    sharded = {spec.embed_tokens + ".weight", spec.lm_head + ".weight"}
    for i in range(len(plain.get_submodule(spec.layers))):
        for path, kind in spec.tp_plan.items():
            sharded.add(f"{spec.layers}.{i}.{path}.weight")
            if kind != "rowwise":
                sharded.add(f"{spec.layers}.{i}.{path}.bias")
    return sum(p.numel() // tp if n in sharded else p.numel() for n, p in plain.named_parameters())


def _one_case(family: str, sp: bool, tp_mesh, dp_rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    from trellis.parallel.hf_surgery import prepare_model
    from trellis.parallel.models import family_for
    from trellis.parallel.tensor_parallel import apply_tensor_parallel, tp_local_numel

    spec = family_for(family)
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    prepare_model(model, spec)
    expected_numel = _expected_local_numel(model, spec, tp_mesh.size())
    apply_tensor_parallel(model, tp_mesh, spec, sequence_parallel=sp)
    ids, labels = _batch(dp_rank)

    out = {"family": family, "sp": sp}
    ref_loss, n_ref = _loss(ref, ids, labels, False)
    loss, n = _loss(model, ids, labels, True)
    assert n == n_ref == labels.numel() - 3
    out["d_loss"], out["ref_loss"] = abs(loss - ref_loss), ref_loss
    ref_grads = {k: v.grad.detach() for k, v in ref.named_parameters()}
    # Partial (not yet reduced) gradients would be summed wrongly by code that works on local shards
    # (grad clipping, ZeRO-1 sync): every grad must already carry its parameter's placement.
    out["grad_placement_mismatch"] = [(k, p.grad.placements, p.placements) for k, p in model.named_parameters()
                                      if isinstance(p, DTensor) and p.grad.placements != p.placements]
    out["d_grad"] = _max_delta(_hf_named(model, "grad", family), ref_grads)
    out["logits_sharded"] = isinstance(model(input_ids=ids).logits, DTensor)

    embed, head = model.get_submodule(spec.embed_tokens), model.get_submodule(spec.lm_head)
    out["tied"] = head.weight is embed.weight
    out["ref_tied"] = ref.get_submodule(spec.lm_head).weight is ref.get_submodule(spec.embed_tokens).weight
    out["local_numel"], out["expected_numel"] = tp_local_numel(model), expected_numel

    for m in (ref, model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    out["d_param"] = _max_delta(_hf_named(model, "param", family), {k: v.detach() for k, v in ref.named_parameters()})
    out["tied_after_step"] = head.weight is embed.weight
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
    out["d_loss2"] = abs(_loss(model, ids, labels, True)[0] - _loss(ref, ids, labels, False)[0])
    return out


def tp_numerics(rank: int, world: int, cases: list[tuple[str, bool]], scenarios: list[dict]) -> dict:
    import torch.distributed as dist

    from trellis.parallel.dims import ParallelDims

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    dims = ParallelDims(dp=world // 2, pp=1, tp=2, world_size=world)
    mesh = dims.build_mesh("cpu")
    dp_rank = mesh["dp"].get_local_rank()
    results = [_one_case(f, sp, mesh["tp"], dp_rank) for f, sp in cases]
    # engine level, in the same process group (init_distributed reuses it)
    return {"module": results, "train": train_scenarios(rank, world, scenarios) if scenarios else []}


def _check_module_results(ranks: list[dict], label: str) -> None:
    for r, res in enumerate(ranks):
        for c in res["module"]:
            name = f"{label} rank{r} {c['family']}{' +sp' if c['sp'] else ''}"
            print(f"{name}: |Δloss| {c['d_loss']:.2e}  max|Δgrad| {c['d_grad']:.2e}  "
                  f"max|Δparam| after SGD {c['d_param']:.2e}  |Δloss2| {c['d_loss2']:.2e}  "
                  f"local numel {c['local_numel']}")
            assert c["d_loss"] <= TOL and c["d_grad"] <= TOL and c["d_param"] <= TOL and c["d_loss2"] <= TOL, name
            assert c["logits_sharded"] and not c["grad_placement_mismatch"], (name, c["grad_placement_mismatch"])
            assert c["tied"] == c["ref_tied"] and c["tied_after_step"] == c["ref_tied"], name
            assert c["local_numel"] == c["expected_numel"], name


# ---------------------------------------------------------------- engine level (checked in the parent)

# eps=1e-6: Adam's first steps move each weight by ~lr*sign(g), so elements whose gradient is at rounding
# level (~1e-10) would flip by ±lr between reduction orders; a larger eps keeps that noise at rounding level.
EXACT = {"train.eps": 1e-6, "train.steps": 3, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
         "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
         "data.seq_len": 64, "logging.progress": "none"}
PRESETS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-opt": "opt", "tiny-bloom": "bloom", "tiny-neox": "gpt_neox",
           "tiny-qwen3": "qwen3", "tiny-phi3": "phi3", "tiny-gemma2": "gemma2"}
NEW_FAMILIES = ("qwen3", "phi3", "gemma2")  # issue 19
# The new families train at Adam eps=1e-5: with eps=1e-6, weights whose gradient sums cancel to rounding level
# move by lr·g/eps, so two reduction orders differ there by ~1e-5 (tp2 tiny-qwen3: the embedding 1.1e-5, every
# other weight <= 2.0e-6, Δloss 4.8e-7; pp2 tiny-phi3, whose unfused q/k/v reorder the input-gradient sums:
# 1.08e-5 with Δloss 0.0). eps=1e-5 keeps that amplification at rounding level (qwen3 tp2: 1.3e-6), as
# EXACT's eps does for the older five; the tolerance stays 1e-5.
NEW_EPS = {"train.eps": 1e-5}


def _check_train(out, ov, model_type, label):
    ref_losses, ref_state = reference_run(configs.load("tiny-llama", ov), 3)
    losses = [r["loss"] for r in out["records"]]
    state = to_hf_state_dict(out["state"], model_type)
    dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
    dw = max((state[k] - v).abs().max().item() for k, v in ref_state.items())
    print(f"{label}: max |Δloss| {dl:.2e}, max |Δw| {dw:.2e}")
    assert len(losses) == 3 and dl <= TOL and dw <= TOL, label
    return ref_state


def test_tp2_every_family(tmp_path):
    cases = [(f, False) for f in ("llama", "gpt2", "opt", "bloom", "gpt_neox", *NEW_FAMILIES)]
    cases += [(f, True) for f in ("llama", "gpt2", "bloom", "gpt_neox", *NEW_FAMILIES)]
    eps = {f"tiny-{f}": NEW_EPS for f in NEW_FAMILIES}
    scenarios = [{"overrides": {**EXACT, **eps.get(f, {}), "model.path": f, "parallel.dp": 1, "parallel.tp": 2,
                                "logging.metrics_file": str(tmp_path / f"{f}.jsonl")}} for f in PRESETS]
    ranks = run_ranks(2, tp_numerics, cases, scenarios, timeout=500)
    _check_module_results(ranks, "tp2")
    for i, (f, sc) in enumerate(zip(PRESETS, scenarios)):
        model_type = PRESETS[f]
        ref_state = _check_train(ranks[0]["train"][i], sc["overrides"], model_type, f"train tp2 {f}")
        # Each rank holds about half the parameters: sharded linears/embedding, replicated norms/biases.
        n = sum(v.numel() for k, v in ref_state.items()
                if not (k == "lm_head.weight" and model_type in ("gpt2", "opt", "bloom", "gemma2")))
        held = [ranks[r]["train"][i]["memory"]["params"] // 4 for r in (0, 1)]
        assert held[0] == held[1] and 0.5 * n <= held[0] < 0.6 * n, (f, held, n)


def test_dp2_tp2_with_zero_accumulation_and_checkpointing(tmp_path):
    cases = [("llama", False), ("bloom", False), ("llama", True)]
    train_cases = {
        "llama dp2·tp2 zero1": {"model.path": "tiny-llama", "zero.stage": 1},
        "llama dp2·tp2 zero3 +ckpt": {"model.path": "tiny-llama", "zero.stage": 3, "activation_checkpointing.mode": "full"},
        "bloom dp2·tp2 zero2": {"model.path": "tiny-bloom", "zero.stage": 2},
    }
    scenarios = [{"overrides": {**EXACT, **ov, "parallel.dp": 2, "parallel.tp": 2,
                                "logging.metrics_file": str(tmp_path / f"{i}.jsonl")}} for i, ov in enumerate(train_cases.values())]
    ranks = run_ranks(4, tp_numerics, cases, scenarios, timeout=500)
    _check_module_results(ranks, "dp2·tp2")
    # each dp rank saw its own batch: the two dp replicas' losses differ (the data really was split)
    assert ranks[0]["module"][0]["ref_loss"] == ranks[1]["module"][0]["ref_loss"] != ranks[2]["module"][0]["ref_loss"]
    for i, (label, ov) in enumerate(train_cases.items()):
        _check_train(ranks[0]["train"][i], scenarios[i]["overrides"], "bloom" if "bloom" in label else "llama", label)


# ---------------------------------------------------------------- errors (no processes needed)

def test_unsupported_family_lists_supported_ones():
    from trellis.parallel.models import family_for

    with pytest.raises(ConfigError) as e:
        family_for("mixtral")
    msg = str(e.value)
    assert "mixtral" in msg and all(t in msg for t in ("llama", "gpt2", "opt", "bloom", "gpt_neox"))


def test_tp_not_dividing_heads_is_a_config_error():
    from trellis.parallel.dims import ParallelDims, validate_model_dims

    with pytest.raises(ConfigError) as e:
        validate_model_dims(ParallelDims(dp=1, pp=1, tp=3, world_size=3), num_heads=4, num_kv_heads=2, num_layers=2,
                            vocab_size=513, intermediate_size=129, micro_batches=1)
    msg = str(e.value)
    assert "parallel.tp=3 does not divide num_attention_heads=4" in msg and "num_key_value_heads=2" in msg


def test_sequence_parallel_refused_where_there_is_no_plan():
    from trellis.parallel.models import family_for
    from trellis.parallel.tensor_parallel import apply_tensor_parallel

    # Refused before any collective, so no mesh is needed.
    with pytest.raises(ConfigError, match="parallel.sequence_parallel is not supported for model type 'opt'"):
        apply_tensor_parallel(tiny_model("opt"), None, family_for("opt"), sequence_parallel=True)
