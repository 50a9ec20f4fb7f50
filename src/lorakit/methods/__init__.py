"""Ways to adapt a model besides LoRA, each a small sibling of the LoRA layer families: full
fine-tuning, IA³, prompt tuning, prefix tuning and bottleneck adapters. Each one attaches to a
transformers causal LM, names the tensors it trains by their file key, saves and loads them (in
PEFT's format where PEFT has the method), and says whether it merges. ``method.py`` is the
common shape and the registry; the training loop and inference loading go through it."""
