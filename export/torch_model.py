"""ModelWeights -> a transformers *ForCausalLM holding exactly those weights.

Used for the teacher (full precision) and the student (the dequantized GGUF, padded widths
and all: the head dimension is explicit in the config, so extra zero heads are fine).
"""

from __future__ import annotations

import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelWeights


def to_hf_model(weights: ModelWeights, dtype=None, device: str = "cpu"):
    """Build the transformers model for `weights` (eval mode, no gradients on the base).

    Args:
        weights: from `load_model` or `read_gguf`.
        dtype: torch dtype of the parameters (default float32).
        device: where to put it.

    Example:
        teacher = to_hf_model(load_model(), dtype=torch.bfloat16, device="cuda")
    """
    import torch
    import transformers

    dtype = dtype or torch.float32
    config_dict = weights.config.to_hf_config()
    if "rope_freqs.weight" in weights.tensors and weights.config.rope_scaling is None:
        raise RecoverLoraError(
            "this GGUF carries llama3 rope frequency factors but not their parameters; "
            "load the model from its Hugging Face folder to build it in torch"
        )
    model_type = config_dict.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    # Parameters on the meta device (no random init of GBs of weights), then take the real tensors.
    # Buffers are built for real: they are computed from the config, not stored (rotary inv_freq,
    # Gemma's embedding scale), and no checkpoint would give them back.
    from accelerate import init_empty_weights  # a dependency of peft

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for name in weights.tensors:
        if name == "rope_freqs.weight":
            continue
        state[name] = torch.from_numpy(np.array(weights.tensors[name], dtype=np.float32)).to(dtype)
    expected = set(model.state_dict())
    if weights.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise RecoverLoraError(
            f"weights do not fit {config_dict['architectures'][0]}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if weights.config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RecoverLoraError(f"internal error: {leftover[0]} was not loaded")
    model.requires_grad_(False)
    return model.to(device).eval()
