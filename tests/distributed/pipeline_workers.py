"""Rank function for test_pipeline.py: the pipeline API alone (no trainer) against the unsharded model.

Every rank builds the same seeded model twice: one copy is the 1-process reference (full batch), the other
is cut into this rank's stage. Grads are compared by fully-qualified name, so a stage that renamed or
dropped parameters fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
BATCH, SEQ, MICRO = 4, 16, 4


def _model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(MODELS / name)
    attn = "eager" if cfg.model_type == "bloom" else "sdpa"  # BLOOM has no sdpa path in transformers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)


def _loss_fn(n_tokens: int):
    # normalised by the global token count, as the trainer does: micro-batch losses sum to the step loss
    def loss(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / n_tokens
    return loss


def _causality(stage, is_first: bool, vocab: int, hidden: int) -> float:
    """Max change of outputs before position t when the input at t changes (0 for a causal stage)."""
    t = SEQ // 2
    with torch.no_grad():
        if is_first:
            x = torch.randint(0, vocab, (2, SEQ))
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % vocab
        else:
            x = torch.randn(2, SEQ, hidden)
            y = x.clone()
            y[:, t] += 1.0
        a, b = stage(x), stage(y)
        assert (a[:, t] - b[:, t]).abs().max() > 0, "the changed position must matter"
        return (a[:, :t] - b[:, :t]).abs().max().item()


def pipeline_checks(rank: int, world: int, cases: list[tuple[str, str, bool]]) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from trellis.parallel.models import family_for
    from trellis.parallel.pipeline import TWO_STAGE_SCHEDULES, build_pipeline, stage_ids_for

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    pp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))["pp"]
    out = {}
    for name, schedule, full in cases:
        model = _model(name)
        spec = family_for(model.config.model_type)
        ref = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        loss_fn = _loss_fn(BATCH * SEQ)
        pipe = build_pipeline(model, spec, pp_mesh, schedule=schedule, n_microbatches=MICRO, split_mode="even",
                              loss_fn=loss_fn)
        hidden = ref.config.hidden_size
        res = {"causal_delta": max(_causality(m, m.is_first, vocab, hidden) for m in pipe.stage_modules)}
        params = [(n, p) for m in pipe.stage_modules for n, p in m.named_parameters()]
        pipe.make_schedule()
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        opt = torch.optim.SGD([p for _, p in params], lr=0.5)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        res["loss_delta"], res["grad_delta"], res["weight_delta"] = [], [], []
        for _ in range(2 if full else 1):
            opt.zero_grad()
            ref_opt.zero_grad()
            ref_loss = loss_fn(ref(input_ids=ids).logits, labels)
            ref_loss.backward()
            loss = pipe.train_step(ids, labels)
            pipe.sync_replicated_grads()
            if pipe.is_last:
                res["loss_delta"].append(abs(loss - ref_loss.item()))
            else:
                assert loss is None
            names = [n for n, _ in params]
            assert names and all(n in ref_params for n in names), names
            res["grad_delta"].append(max((p.grad - ref_params[n].grad).abs().max().item()
                                         for n, p in params))
            opt.step()
            ref_opt.step()
            res["weight_delta"].append(max((p - ref_params[n]).abs().max().item()
                                           for n, p in params))
        assert len(names) == len(set(names)), "virtual stages of one rank must not share parameters"
        assert len(pipe.stage_modules) == (2 if schedule in TWO_STAGE_SCHEDULES else 1)
        assert pipe.stage_ids == stage_ids_for(schedule, rank, world)
        ev = pipe.eval_step(ids, labels)  # forward-only loss with the updated weights
        with torch.no_grad():
            ref_ev = loss_fn(ref(input_ids=ids).logits, labels).item()
        res["eval_delta"] = abs(ev - ref_ev) if pipe.is_last else 0.0
        res["param_names"] = sorted(names)
        copies = pipe._tied_params() if pipe.tied else []
        if len(copies) == 1:  # one copy per rank: compared across ranks by the test
            res["tied_copy"] = copies[0].detach().clone()
        elif len(copies) == 2:  # V placement: both copies on this rank
            res["tied_local_delta"] = (copies[0] - copies[1]).abs().max().item()
        out[f"{name} {schedule}"] = res
    return out
