"""A hand-written single-process reference: HF model + plain torch AdamW, no trellis parallel code.

It sees the same global batch per step as a parallel run (micro_batch × grad_accum × dp samples, in the
engine's documented data order) and normalises the loss by the global token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_run(cfg, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from trellis.engine.data import GlobalBatchSampler, build_dataset
    from trellis.engine.model import build_model
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    t = cfg.train
    assert t.schedule == "constant" and t.warmup_steps == 0 and t.weight_decay == 0, "reference supports constant LR only"
    model, model_dir = build_model(cfg.model, seed=t.seed)
    tok = load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer))
    data, _ = build_dataset(cfg.data, tok, t.seed)
    dp = max(cfg.parallel.dp, 1)
    sampler = GlobalBatchSampler(data, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum * dp,
                                 dp_rank=0, dp_size=1)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0,
                            foreach=False)
    losses = []
    for _ in range(steps):
        batches = sampler.next()
        n_tokens = sum(b.labels.numel() for b in batches)
        total = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b.labels.reshape(-1),
                                   reduction="sum") / n_tokens
            loss.backward()
            total += loss.item()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
