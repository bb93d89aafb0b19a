"""Export a PEFT training checkpoint (any layout) as a peft adapter or as a merged HF model directory.

Runs in one process with no process group: DCP reads every rank's shards of the adapter tensors into
full tensors (engine/checkpoint/convert.py: full_sections), so a ZeRO-3 / TP / PP checkpoint exports complete
adapters. The unsharded base is rebuilt from the run's own config (model.path, seed), peft wraps it with
the run's peft config, the adapters are loaded under their FQNs and peft itself writes its format
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<fqn>` without `.default`).
AdaLoRA: the checkpoint's final rank pattern goes into the config, so peft saves each module's lora_A/E/B
cut to the ranks the budget kept (and loads them back at those ranks), as its own training loop would.

GPT-2 (and Phi-3's qkv_proj / gate_up_proj alike): trellis trains it with c_attn unfused into q/k/v Linears
(parallel/hf_surgery.py), each with its own rank-r LoRA; peft's format addresses the fused Conv1D c_attn.
Three rank-r adapters are exactly one rank-3r adapter on the fused layer: A = [A_q; A_k; A_v] and B = blockdiag(B_q, B_k, B_v), with c_attn's rank
and alpha set per module (rank_pattern / alpha_pattern) so the scaling is unchanged. LoRA / rsLoRA only.

Merged export with a 4-bit base (QLoRA): the adapters were trained against the *dequantized* 4-bit
weights, so those are what they are merged into. We rebuild them exactly as training quantized them:
the full linear when tp == 1, each tp rank's shard (colwise rows / rowwise columns) when tp > 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trellis import configs
from trellis.errors import CheckpointError, UserError
from trellis.parallel.models import family_for
from trellis.parallel.quant4bit import block_linears, dequantized_weight, linear_to_quantized

from ..checkpoint import io
from ..checkpoint.convert import full_sections, require_native, write_hf_extras
from ..model import build_model
from .inject import PROMPT_LEARNING, build_peft_config
from .lazy import import_peft
from .prompt import PROMPT_MODULE, prompt_config
from .quantize import quant_spec


def resolve_checkpoint(path: Path) -> Path:
    """A step directory, or a checkpoint root (its latest valid step)."""
    path = Path(path)
    if io.read_metadata(path) is not None:
        return path
    latest = io.latest_valid(path) if path.is_dir() else None
    if latest is None:
        raise UserError(f"{path}: neither a checkpoint (step-N with metadata.json) nor a directory holding one")
    return latest


def _run_config(path: Path, meta: dict):
    cfg = configs.load(str(path / "config.toml"))
    if cfg.peft.method == "none" or meta.get("peft", "none") == "none":
        raise UserError(f"{path}: not a PEFT run (peft.method='none'); use `trellis checkpoint convert --to hf`")
    require_native(path, meta, "PEFT export reads native checkpoints")
    return cfg


def _dequantize_like_training(model, spec, cfg, tp: int) -> None:
    """Replace the decoder-block linears' weights by the dequantized 4-/8-bit values training used."""
    q = quant_spec(cfg)
    kinds = spec.tp_plan
    for block in model.get_submodule(spec.layers):
        for path, kind in kinds.items():
            lin = block.get_submodule(path)
            w = lin.weight.detach()
            dim = 1 if kind == "rowwise" else 0
            parts = w.chunk(tp, dim=dim) if tp > 1 else [w]
            deq = [dequantized_weight(linear_to_quantized(p.contiguous(), None, q)) for p in parts]
            with torch.no_grad():
                lin.weight.copy_(torch.cat(deq, dim=dim))
    covered = {id(block.get_submodule(p)) for block in model.get_submodule(spec.layers) for p in kinds}
    if any(id(lin) not in covered for _, _, lin in block_linears(model, spec)):
        raise CheckpointError("a 4-bit decoder-block linear is not in the family's TP plan; cannot rebuild it")


def _fused_groups(spec, base) -> dict[str, list[tuple[str, int]]]:
    """Leaf name of each fused HF linear trellis trains unfused -> its parts and their output widths:
    GPT-2's c_attn (q, k, v of hidden each), Phi-3's qkv_proj and gate_up_proj (FamilySpec.fused)."""
    from trellis.parallel.models.dims import dims_from_hf_config, size_of

    if spec.name == "gpt2":
        h = base.config.n_embd
        return {"c_attn": [("q", h), ("k", h), ("v", h)]}
    d = dims_from_hf_config(base.config)
    return {path.rpartition(".")[2]: [(n, size_of(d, e)) for n, e in parts] for path, parts in spec.fused.items()}


def _fuse_lora(state: dict[str, torch.Tensor], pc, rslora: bool, groups: dict[str, list[tuple[str, int]]]
               ) -> dict[str, torch.Tensor]:
    """LoRA tensors of trellis' unfused parts (GPT-2 c_attn.{q,k,v}, Phi-3 qkv_proj.{q,k,v} and
    gate_up_proj.{gate,up}) as LoRA of HF's fused linear, in place of them; `pc` gets the exact adapted module
    names and the fused modules' rank / alpha patterns. m rank-r adapters are exactly one rank-m·r adapter:
    A = [A_1; ...; A_m], B block-diagonal (rows of the parts that have no adapter stay zero)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    modules = set()
    for k, v in state.items():
        mod, _, rest = k.partition(".lora_")
        parent, _, part = mod.rpartition(".")
        leaf = parent.rpartition(".")[2]
        if leaf in groups and part in dict(groups[leaf]):
            if rest.startswith("A."):
                a, b = v, state[f"{mod}.lora_B.{rest[2:]}"]
                fused.setdefault(parent, {})[part] = (a, b)
            continue
        out[k] = v
        modules.add(mod)
    r, alpha = pc.r, pc.lora_alpha
    pc.rank_pattern, pc.alpha_pattern = dict(pc.rank_pattern or {}), dict(pc.alpha_pattern or {})
    for parent, parts in fused.items():
        layout = groups[parent.rpartition(".")[2]]
        names = [n for n, _ in layout if n in parts]
        m = len(names)
        a = torch.cat([parts[x][0] for x in names])
        b = torch.zeros(sum(w for _, w in layout), m * r, dtype=a.dtype)
        offsets, start = {}, 0
        for n, w in layout:
            offsets[n], start = (start, w), start + w
        for i, x in enumerate(names):
            o, w = offsets[x]
            b[o:o + w, i * r:(i + 1) * r] = parts[x][1]
        out[f"{parent}.lora_A.default.weight"], out[f"{parent}.lora_B.default.weight"] = a, b
        modules.add(parent)
        # scaling alpha/r (rsLoRA alpha/sqrt(r)) must not change with the rank: r' = m r
        pc.rank_pattern[parent] = m * r
        pc.alpha_pattern[parent] = alpha * (m ** 0.5 if rslora else m)
    pc.target_modules = sorted(modules)
    return out


def refuse_lora(state: dict[str, torch.Tensor], pc, rslora: bool, spec, base) -> dict[str, torch.Tensor]:
    """The adapters of a family trellis trains unfused (GPT-2, Phi-3) in peft's format for the HF model."""
    out = _fuse_lora(state, pc, rslora, _fused_groups(spec, base))
    if spec.name == "gpt2":
        pc.fan_in_fan_out = True  # HF GPT-2's Conv1D stores weights (in, out)
    return out


def load_peft_model(path: Path, *, dequantized_base: bool = False):
    """(peft model with the checkpoint's adapters, run config, model dir) on the unsharded fp32 base."""
    # the base is full precision here (a QLoRA base is dequantized first): peft needs no bitsandbytes
    get_peft_model = import_peft(bitsandbytes=False).get_peft_model

    meta = io.verify(path)
    cfg = _run_config(path, meta)
    base, model_dir = build_model(cfg.model, seed=cfg.train.seed)
    spec = family_for(base.config.model_type)
    prompt = cfg.peft.method in PROMPT_LEARNING
    unfused = spec.name == "gpt2" or bool(spec.fused)
    if unfused and not prompt and cfg.peft.method not in ("lora", "rslora"):
        what = "c_attn into q/k/v" if spec.name == "gpt2" else "qkv_proj / gate_up_proj into their parts"
        raise UserError(f"export of {spec.name} adapters supports peft.method 'lora' / 'rslora' and prompt learning, "
                        f"not {cfg.peft.method!r} (trellis unfuses {what}; only LoRA re-fuses exactly)")
    if dequantized_base and quant_spec(cfg) is not None:
        _dequantize_like_training(base, spec, cfg, int(meta["layout"].get("tp", 1)))
    if prompt:
        pc = prompt_config(cfg, base.config)
    else:
        pc = build_peft_config(cfg, spec, cfg.train.steps)
    pc.base_model_name_or_path = str(cfg.model.path)
    saved = full_sections(path, ("model", "adalora"))  # adalora: {} unless an AdaLoRA run
    state = saved["model"]
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no adapter tensors")
    if unfused and not prompt:
        state = refuse_lora(state, pc, cfg.peft.method == "rslora", spec, base)
    model = get_peft_model(base, pc)
    if prompt:  # our in-place prompt module -> peft's wrapper attribute
        sd = {f"prompt_encoder.default.{k[len(PROMPT_MODULE) + 1:]}": v.float() for k, v in state.items()}
    else:
        # A 4-bit base layer adds its quant-state buffers (absmax, quant_map, ...) to the module state
        # dict; they are frozen base state, rebuilt from the base above, not adapters.
        sd = {f"base_model.model.{k}": v.float() for k, v in state.items() if ".base_layer." not in k}
    own = dict(model.named_parameters())
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in sd)
    if unexpected or missing:
        raise CheckpointError(f"{path}: adapters do not match peft.method={cfg.peft.method!r} on this base: "
                              f"unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.reshape(own[k].shape))
    if cfg.peft.method == "adalora":
        ada = saved["adalora"]
        if int(ada["has_rank_pattern"].item()):  # engine/peft/adalora.py: keys rank_pattern/<lora_E FQN>
            model.peft_config["default"].rank_pattern = {
                k.split("/", 1)[1]: v.bool().tolist() for k, v in ada.items() if k.startswith("rank_pattern/")}
    return model, cfg, model_dir


def export_adapter(checkpoint: Path, out: Path) -> Path:
    path = resolve_checkpoint(checkpoint)
    model, cfg, _ = load_peft_model(path)
    out = Path(out)
    model.save_pretrained(str(out))
    if not (out / "adapter_model.safetensors").stat().st_size:
        raise CheckpointError(f"{out}: wrote an empty adapter")
    (out / "trellis_export.json").write_text(json.dumps({"source": str(path), "method": cfg.peft.method}))
    return out


def export_merged(checkpoint: Path, out: Path) -> Path:
    """A full HF model directory (adapters merged; a 4-bit base is merged into its dequantized weights)."""
    path = resolve_checkpoint(checkpoint)
    model, cfg, model_dir = load_peft_model(path, dequantized_base=True)
    if cfg.peft.method in PROMPT_LEARNING:
        raise UserError(f"peft.method={cfg.peft.method!r}: virtual tokens cannot be merged into the weights; "
                        "use `trellis export adapter`")
    merged = model.merge_and_unload()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in merged.parameters()})
    out = Path(out)
    merged.save_pretrained(str(out))
    write_hf_extras(out, path, merged.config)
    (out / "trellis_export.json").write_text(json.dumps({"source": str(path), "method": cfg.peft.method,
                                                          "merged": True, "dtype": ",".join(dtypes)}))
    return out


def merged_dtype_note(out: Path) -> str:
    """What `trellis export merged` says it wrote, e.g. "float32 weights (the 4-bit nf4 base dequantized...)"."""
    info = json.loads((Path(out) / "trellis_export.json").read_text())
    cfg = configs.load(str(Path(info["source"]) / "config.toml"))
    note = f"{info['dtype']} weights"
    q = quant_spec(cfg)
    if q is not None:
        note += (f" (the 4-bit {q.quant_type} base dequantized to {info['dtype']} exactly as training saw it, "
                 "adapters merged into it)")
    return note
