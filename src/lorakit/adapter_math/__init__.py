"""Maths on saved LoRA adapters, read from and written to their files: the spectrum of each layer's
update (``lorakit rank``), truncation to a lower rank (``lorakit resize``) and combining several
adapters into one (``lorakit combine``). No base model is needed for any of them."""
