"""The Python API (trellis.initialize / Engine.train_step with a custom loss_fn) on real gloo ranks, against a
1-process loop written here: a Hugging Face model, torch's AdamW, the same loss, the same global batches.

One 2-rank launch runs every 2-rank scenario (dp2, tp2, pp2 with the label-smoothed loss; a loss reading an
extra per-sample key under pp2; the vocab-parallel path under tp2; DeepSpeed dp2 ZeRO-2; the CLI's Trainer vs
the API loop; bad calls); one 8-rank launch runs dp2·pp2·tp2 ZeRO-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trellis import configs

from .harness import run_ranks

pytestmark = pytest.mark.distributed

STEPS = 3
TOL = 1e-5
BASE = {
    "train.steps": STEPS, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
    "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
    "data.seq_len": 32, "logging.progress": "none",
}
SMOOTHING = 0.1


# ---- the user's losses (torch ops only) --------------------------------------------------------------
def smoothed_ce(logits: torch.Tensor, batch) -> tuple[torch.Tensor, int]:
    """Label-smoothed cross-entropy, summed over counted tokens (torch's loss_parallel cannot smooth)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = batch.labels != -100
    nll = -logp.gather(-1, batch.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    per_token = (1 - SMOOTHING) * nll - SMOOTHING * logp.mean(-1)
    return per_token[mask].sum(), int(mask.sum())


def weighted_ce(logits: torch.Tensor, batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy with a per-sample weight from the batch's extra key "weight" ([b])."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), reduction="none").view(batch.labels.shape)
    return (ce * batch.extra["weight"][:, None]).sum(), int((batch.labels != -100).sum())


def vocab_parallel_ce(logits, batch):
    """Plain cross-entropy on vocab-sharded DTensor logits (inside loss_parallel); records what it was given."""
    vocab_parallel_ce.saw_dtensor = type(logits).__name__ == "DTensor"
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, batch.labels.reshape(-1), reduction="sum"), int((batch.labels != -100).sum())


vocab_parallel_ce.vocab_parallel = True
LOSSES = {"smoothed": smoothed_ce, "weighted": weighted_ce, "vocab_parallel": vocab_parallel_ce}


def sample_weights(input_ids: torch.Tensor) -> torch.Tensor:
    """A deterministic per-sample weight from the sample's content (so the reference computes the same)."""
    return 1.0 + (input_ids[:, 0] % 4).float()


def with_weights(micro_batches):
    return [{"input_ids": b.input_ids, "labels": b.labels, "weight": sample_weights(b.input_ids)}
            for b in micro_batches]


# ---- inside the ranks ------------------------------------------------------------------------------------
def api_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    import trellis
    from trellis.engine.trainer import Trainer
    from trellis.errors import UserError

    out = []
    for sc in scenarios:
        ov = [f"--{k}={v}" for k, v in sc["overrides"].items()]
        cfg = trellis.load_config("tiny-llama", ov)
        if sc.get("cli"):  # what `trellis train` runs on every rank (engine/run.py: train_this_rank)
            trainer = Trainer(cfg, trainer_ctx())
            trainer.train()
            recs = [json.loads(line) for line in Path(cfg.logging.metrics_file).read_text().splitlines()] \
                if rank == 0 else []
            out.append({"losses": [r["loss"] for r in recs]})
            continue
        engine = trellis.initialize(cfg)
        loss_fn = LOSSES.get(sc.get("loss"))
        res = {"losses": [], "lrs": [], "steps": [], "norms": []}
        if sc.get("bad_calls"):
            mbs = next(engine.batches())
            res["errors"] = []
            for bad in (mbs[:1], [{"input_ids": mbs[0].input_ids}, mbs[1]]):
                try:
                    engine.train_step(bad)
                except UserError as e:
                    res["errors"].append(str(e))
        counter = _ScalarReduceCounter() if sc.get("count_reductions") else None
        for mbs in engine.batches():
            if sc.get("relabel") and rank == 1:  # after the sampler counted the targets: the count is stale
                for b in mbs:
                    b.labels[:, :RELABEL] = -100
            if counter is not None:
                counter.calls = 0
            r = engine.train_step(with_weights(mbs) if sc.get("loss") == "weighted" else mbs, loss_fn=loss_fn)
            if counter is not None:
                res.setdefault("reductions", []).append(counter.calls)
            res["losses"].append(r.loss)
            res["norms"].append(r.grad_norm)
            res["lrs"].append(r.lr)
            res["steps"].append(engine.step)
            if engine.step == sc.get("save_at"):  # save, then continue in a fresh engine from the checkpoint
                saved = engine.save(sc["save_dir"])
                engine = trellis.initialize(cfg)
                res["loaded"] = str(engine.load(sc["save_dir"]))
                res["saved"] = str(saved)
                break
        if "save_at" in sc:
            for mbs in engine.batches():
                res["losses"].append(engine.train_step(mbs, loss_fn=loss_fn).loss)
                res["steps"].append(engine.step)
        if sc.get("export_to"):
            res["exported"] = str(engine.export_adapter(sc["export_to"]))
        if sc.get("loss") == "vocab_parallel":
            res["saw_dtensor"] = vocab_parallel_ce.saw_dtensor
        out.append(res)
    return out


RELABEL = 4  # positions the "relabel" scenario masks on rank 1 after the sampler counted the targets


class _ScalarReduceCounter:
    """Counts the all_reduce calls of small (≤ 16 element) tensors: the step's scalar collectives. It wraps
    torch.distributed.all_reduce and calls through (the real collective runs); gradient buckets are larger."""

    def __init__(self):
        import torch.distributed as dist

        self.calls = 0
        real = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            if tensor.numel() <= 16:
                self.calls += 1
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counted


def trainer_ctx():
    from trellis.engine.distributed import init_distributed

    return init_distributed(120.0)


# ---- the 1-process reference (no trellis parallel code) -----------------------------------------------
def reference_losses(overrides: dict, loss_name: str | None, steps: int = STEPS, relabel_from: int | None = None) -> list[float]:
    return reference_run(overrides, loss_name, steps, relabel_from)[0]


def reference_run(overrides: dict, loss_name: str | None, steps: int = STEPS,
                  relabel_from: int | None = None) -> tuple[list[float], list[float]]:
    """(losses, gradient norms before clipping) of the 1-process loop."""
    from trellis.engine.data import GlobalBatchSampler, build_dataset
    from trellis.engine.model import build_model
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    cfg = configs.load("tiny-llama", overrides)
    t = cfg.train
    model, model_dir = build_model(cfg.model, seed=t.seed)
    data, _ = build_dataset(cfg.data, load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer)), t.seed)
    sampler = GlobalBatchSampler(data, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum * cfg.parallel.dp,
                                 dp_rank=0, dp_size=1)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0,
                            foreach=False)
    losses, norms = [], []
    for _ in range(steps):
        batches = sampler.next()
        if relabel_from is not None:  # what the "relabel" scenario's rank 1 does to its micro-batches
            for b in batches[relabel_from:]:
                b.labels[:, :RELABEL] = -100
        n = sum(int((b.labels != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids).logits
            if loss_name == "weighted":
                b.extra["weight"] = sample_weights(b.input_ids)
            if loss_name in ("smoothed", "weighted"):
                loss_sum, _ = LOSSES[loss_name](logits, b)
            else:
                loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten(), reduction="sum")
            loss = loss_sum / n
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms


def _check(name: str, got: dict, ov: dict, loss: str | None) -> float:
    """Losses and gradient norms (the step's one scalar all-reduce adds each rank's owned squared norm: a
    gradient counted twice or missed shows here) against the 1-process loop."""
    ref, ref_norms = reference_run(ov, loss)
    d = max(abs(a - b) for a, b in zip(got["losses"], ref))
    dn = max(abs(a - b) / b for a, b in zip(got["norms"], ref_norms))
    print(f"{name}: max |Δloss| vs 1-process reference = {d:.2e}, grad norm rel. Δ = {dn:.2e}")
    assert len(got["losses"]) == STEPS and d <= TOL, (name, got["losses"], ref)
    assert dn <= TOL, (name, got["norms"], ref_norms)
    return d


TWO_RANKS = {
    "dp2 smoothed": ({"parallel.dp": 2}, "smoothed"),
    "tp2 smoothed": ({"parallel.dp": 1, "parallel.tp": 2}, "smoothed"),
    "pp2 smoothed": ({"parallel.dp": 1, "parallel.pp": 2}, "smoothed"),
    "pp2 weighted (extra key)": ({"parallel.dp": 1, "parallel.pp": 2}, "weighted"),
    # zero bubble (V placement): rank 0 runs the first and the last stage; the loss feed still matches labels
    "pp2 zbv weighted (extra key)": ({"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_schedule": "zbv"}, "weighted"),
    "tp2 vocab_parallel": ({"parallel.dp": 1, "parallel.tp": 2}, "vocab_parallel"),
    "deepspeed dp2 zero2 smoothed": ({"parallel.dp": 2, "zero.backend": "deepspeed", "zero.stage": 2}, "smoothed"),
}


def test_api_custom_losses_on_2_ranks_equal_the_reference_and_the_cli(tmp_path):
    scenarios = [{"overrides": {**BASE, **ov}, "loss": loss} for ov, loss in TWO_RANKS.values()]
    cli_ov = {**BASE, "parallel.dp": 2, "logging.metrics_file": str(tmp_path / "cli.jsonl"),
              "logging.mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    resume_ov = {**BASE, "parallel.dp": 2, "train.steps": 4}
    lora_ov = {**BASE, "parallel.dp": 2, "train.steps": 1, "peft.method": "lora",
               "checkpoint.dir": str(tmp_path / "lora_ckpt")}
    scenarios += [{"overrides": resume_ov, "loss": "smoothed", "save_at": 2, "save_dir": str(tmp_path / "ck")},
                  {"overrides": lora_ov, "export_to": str(tmp_path / "adapter")},
                  {"overrides": cli_ov, "cli": True},
                  {"overrides": {**BASE, "parallel.dp": 2}, "bad_calls": True},
                  {"overrides": {**BASE, "parallel.dp": 2}, "relabel": True, "count_reductions": True}]
    results = run_ranks(2, api_scenarios, scenarios, timeout=600)
    r0 = results[0]
    for i, (name, (ov, loss)) in enumerate(TWO_RANKS.items()):
        _check(name, r0[i], {**BASE, **ov}, loss)
        assert results[1][i]["losses"] == r0[i]["losses"], name  # the global-batch mean on every rank
        assert r0[i]["steps"] == [1, 2, 3] and r0[i]["lrs"] == [BASE["train.lr"]] * STEPS
    vp = list(TWO_RANKS).index("tp2 vocab_parallel")
    assert r0[vp]["saw_dtensor"], "vocab_parallel = True must get the sharded DTensor logits"
    # smoothing changes the loss: the custom loss was really used (vs plain cross-entropy on the same data)
    plain = reference_losses({**BASE, "parallel.dp": 2}, None)
    assert max(abs(a - b) for a, b in zip(r0[0]["losses"], plain)) > 10 * TOL
    resumed = r0[len(TWO_RANKS)]
    ref4 = reference_losses(resume_ov, "smoothed", steps=4)
    print("save at step 2 + load in a fresh engine:", resumed["losses"], "reference", ref4)
    assert resumed["steps"] == [1, 2, 3, 4] and resumed["loaded"] == resumed["saved"]
    assert max(abs(a - b) for a, b in zip(resumed["losses"], ref4)) <= TOL
    adapter = Path(r0[len(TWO_RANKS) + 1]["exported"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    cli, api = r0[-3]["losses"], r0[-2]["losses"]
    print("CLI", cli, "API", api)
    assert cli == api, "the CLI's Trainer and the API loop must give bit-identical losses"
    # the Trainer's writer follows cfg.logging: the run's losses also went to the MLflow store (read back)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cli_ov["logging.mlflow_tracking_uri"])
    (ml_run,) = client.search_runs([client.get_experiment_by_name("trellis").experiment_id])
    ml_losses = [m.value for m in sorted(client.get_metric_history(ml_run.info.run_id, "loss"), key=lambda m: m.step)]
    assert ml_losses == pytest.approx(cli, rel=1e-12)
    errors = r0[-2]["errors"]
    assert len(errors) == 2
    assert "1 micro-batches, but train.grad_accum=2" in errors[0]
    assert "micro-batch 0: missing 'labels'" in errors[1]
    # labels changed on one rank after the sampler counted them: still the exact global mean (the step's
    # scalar reduction confirms the count and rescales), and one scalar all-reduce per step on every rank
    relabel = r0[-1]
    d = max(abs(a - b) for a, b in zip(relabel["losses"], reference_losses({**BASE, "parallel.dp": 2}, None,
                                                                          relabel_from=BASE["train.grad_accum"])))
    print(f"relabelled on rank 1: max |Δloss| = {d:.2e}; scalar all-reduces per step {relabel['reductions']}")
    assert d <= TOL and relabel["losses"] == results[1][-1]["losses"]
    assert relabel["reductions"] == results[1][-1]["reductions"] == [1] * STEPS


def test_api_dp2_pp2_tp2_zero3_custom_loss_equals_reference():
    ov = {**BASE, "parallel.dp": 2, "parallel.pp": 2, "parallel.tp": 2, "zero.stage": 3}
    results = run_ranks(8, api_scenarios, [{"overrides": ov, "loss": "smoothed"}], timeout=400)
    _check("dp2·pp2·tp2 zero3 smoothed", results[0][0], ov, "smoothed")
