"""PEFT on the partitioned engine: adapter / prompt-module injection before partitioning (inject, prompt),
AdaLoRA's training-time mechanisms (adalora), the QLoRA quantization policy (quantize) and export (export)."""
