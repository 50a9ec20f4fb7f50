"""Quantized bases: group-wise N-bit weights (QA-LoRA's float-min form, GGUF Q4_1's layout)."""
