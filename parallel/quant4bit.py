"""Quantized linears for a frozen PEFT base (bitsandbytes NF4/FP4 ± double quant, or LLM.int8), imported lazily.

int8 (`Linear8bitLt`, has_fp16_weights=False): int8 codes plus one fp32 scale per output row (SCB), exactly
what HF's `BitsAndBytesConfig(load_in_8bit=True)` builds. Only the tp == 1 placement below exists for it;
`configs/validate.py` refuses int8 under tp > 1 (its TP shard is not built yet).

Two placements, one numeric result per weight block:
- tp == 1: every rank quantizes the full linear before PEFT injection (what HF's `BitsAndBytesConfig`
  load does), so peft wraps a bnb `Linear4bit` with its own `lora.bnb.Linear4bit` layer (`quantize_blocks`).
- tp > 1: DTensor cannot shard a packed 4-bit tensor, so adapters are injected on the fp32 base and the
  LoRA-aware TP plan (parallel/peft_tp.py) quantizes *this rank's shard* in place of the base layer
  (`mark_for_tp_quantization`, then `TPLinear4bit`): each rank stores 1/tp of the 4-bit base. The Megatron
  f/g operators (parallel/collectives.py) give the shard the same collectives ColwiseParallel /
  RowwiseParallel would (all-reduce the input grad / the partial output).
Quantization statistics are per block of 64 consecutive elements of a row, so a row shard (colwise)
quantizes exactly like the full weight; a column shard (rowwise) differs only where blocks straddle the
cut (none when in_features / tp is a multiple of 64).

Which runs quantize, and how, is the engine's policy (engine/peft/quantize.py: `quant_spec(cfg)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .collectives import reduce_from, sum_grad_over

QUANT_ATTR = "_trellis_quant"  # set on linears whose (local shard of the) weight is quantized under TP


@dataclass(frozen=True)
class QuantSpec:
    quant_type: str          # "nf4" | "fp4" | "int8"
    double_quant: bool
    compute_dtype: torch.dtype


def linear_to_4bit(weight: torch.Tensor, bias: torch.Tensor | None, q: QuantSpec) -> nn.Module:
    """A frozen bnb Linear4bit holding `weight` (out, in) quantized; `bias` kept in its own dtype."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=q.compute_dtype,
                            compress_statistics=q.double_quant, quant_type=q.quant_type, device="meta")
    lin.weight = bnb.nn.Params4bit(weight.detach().float().cpu().clone(), requires_grad=False,
                                   compress_statistics=q.double_quant, quant_type=q.quant_type, module=lin)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin.to(weight.device)  # .to() quantizes (bnb packs on the first device move)


# Outlier threshold of LLM.int8 (HF BitsAndBytesConfig's default llm_int8_threshold): on a GPU, activation
# columns above it go through an fp16 matmul. bitsandbytes' CPU training path dequantizes and runs an fp matmul,
# so on CPU it changes nothing.
INT8_THRESHOLD = 6.0


_LINEAR8 = []  # the Linear8bitLt subclass, built on first use (bitsandbytes is imported lazily)


def _linear8_class():
    if not _LINEAR8:
        import bitsandbytes as bnb

        class Linear8bitLtBase(bnb.nn.Linear8bitLt):
            """bitsandbytes' Linear8bitLt whose extra state-dict keys (`SCB`, `weight_format`) are also attributes:
            torch.distributed.checkpoint's get_state_dict resolves every key of a module's state dict by getattr."""

            @property
            def SCB(self) -> torch.Tensor:  # noqa: N802 - bitsandbytes' key name
                return int8_row_scales(self)

            @property
            def weight_format(self) -> torch.Tensor:
                return torch.tensor(0, dtype=torch.uint8)  # bitsandbytes' "row-major" marker

        _LINEAR8.append(Linear8bitLtBase)
    return _LINEAR8[0]


def linear_to_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A frozen bnb Linear8bitLt holding `weight` (out, in) as int8 rows + fp32 row scales (SCB)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    lin = _linear8_class()(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                           threshold=INT8_THRESHOLD, device="meta")
    lin.weight = bnb.nn.Int8Params(weight.detach().float().cpu().clone(), requires_grad=False,
                                   has_fp16_weights=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin.to(weight.device)  # .to() quantizes (row-wise absmax, like the 4-bit pack on first move)


def linear_to_quantized(weight: torch.Tensor, bias: torch.Tensor | None, q: QuantSpec) -> nn.Module:
    return linear_to_int8(weight, bias) if q.quant_type == "int8" else linear_to_4bit(weight, bias, q)


def block_linears(model: nn.Module, spec) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the decoder blocks (not embeddings / head)."""
    out = []
    for block in model.get_submodule(spec.layers):
        for parent in block.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    out.append((parent, name, child))
    return out


def quantize_blocks(model: nn.Module, spec, q: QuantSpec) -> int:
    """Replace the decoder blocks' linears by quantized ones (tp == 1). Returns how many were quantized."""
    found = block_linears(model, spec)
    for parent, name, lin in found:
        setattr(parent, name, linear_to_quantized(lin.weight, lin.bias, q))
    return len(found)


def mark_for_tp_quantization(model: nn.Module, spec, q: QuantSpec) -> int:
    """tp > 1: tag the linears; the TP plan quantizes each rank's shard after sharding it."""
    found = block_linears(model, spec)
    for _, _, lin in found:
        setattr(lin, QUANT_ATTR, q)
    return len(found)


def is_quantized_param(p: torch.Tensor) -> bool:
    """A packed frozen base weight FSDP must not split (4-bit Params4bit or 8-bit Int8Params)."""
    return type(p).__name__ in ("Params4bit", "Int8Params")


def int8_row_scales(module: nn.Module) -> torch.Tensor:
    """The fp32 per-row scales (absmax) of a Linear8bitLt: on the weight until the first forward, then
    bitsandbytes moves them to the layer's matmul state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """Full-precision weight of a (possibly quantized) linear."""
    w = module.weight
    if type(w).__name__ == "Int8Params":
        return w.data.float() * (int8_row_scales(module).float()[:, None] / 127.0)
    if is_quantized_param(w):
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()


# ---- the tensor-parallel 4-bit shard --------------------------------------------------------------

class TPLinear4bit(nn.Module):
    """This rank's shard of a frozen linear in 4 bit. colwise: out rows [r·o/tp, (r+1)·o/tp) with replicated
    input and sharded output; rowwise: in columns likewise with sharded input, output all-reduced."""

    def __init__(self, full: nn.Linear, kind: str, tp_mesh, q: QuantSpec, *, input_reduced: bool = False):
        """`input_reduced`: colwise, the caller already applies the block's shared f to the input (the LoRA
        layer's input, parallel/peft_tp.py), so this shard adds no all-reduce of its own."""
        super().__init__()
        self.input_reduced = input_reduced
        from torch.distributed.tensor import DTensor

        self.kind = kind
        self.group = tp_mesh.get_group()
        tp, r = tp_mesh.size(), tp_mesh.get_local_rank()
        w = full.weight.full_tensor() if isinstance(full.weight, DTensor) else full.weight
        b = full.bias
        if b is not None and isinstance(b, DTensor):
            b = b.full_tensor()
        if kind == "rowwise":
            w_local = w.chunk(tp, dim=1)[r]
            self.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        else:
            w_local = w.chunk(tp, dim=0)[r]
            self.bias = None if b is None else nn.Parameter(b.detach().chunk(tp)[r].clone(), requires_grad=False)
        self.inner = linear_to_4bit(w_local, None, q)
        self.in_features, self.out_features = full.in_features, full.out_features

    @property
    def weight(self):  # peft and our exporter read `base_layer.weight`
        return self.inner.weight

    def forward(self, x):
        if self.kind == "rowwise":
            y = reduce_from(self.inner(x), self.group)  # row-parallel "g"
        else:
            y = self.inner(x if self.input_reduced else sum_grad_over(x, self.group))  # column-parallel "f"
        return y if self.bias is None else y + self.bias.to(y.dtype)
