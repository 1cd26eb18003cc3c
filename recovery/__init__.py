"""recovery/: Recover-LoRA — synthetic data, LoRA distillation against the exact GGUF weights, adapter GGUF."""
