"""One decoder block of a transformers causal LM, run on cached inputs: what block-wise reconstruction steps through.

Each architecture's decoder layer is called as its model calls it, with the keyword arguments the model
computed for it (rotary `position_embeddings` from `model.rotary_emb`, the causal or sliding-window
mask, position ids), captured by a forward pre-hook on one window instead of re-derived here: Llama,
Qwen2, Phi-3 and Gemma 3 (two rotary tables, per-layer masks) then need no code of their own. Windows
are never padded, so those arguments are the same for every window; captured with batch 1, they
broadcast over a batch.

Example:
    inputs = layer_inputs(model, ids)                     # [n, seq, hidden]: the input of block 0
    kwargs = layer_kwargs(model, ids.shape[1])            # per block
    outputs = layer_outputs(decoder_layers(model)[0], inputs, kwargs[0])
"""

from __future__ import annotations

import torch

from recover_lora.recovery.student import causal_lm

FORWARD_BATCH = 16  # windows per no-grad block pass (a constant: the results must not depend on a setting)


class _Captured(Exception):
    """Raised by a hook to stop the forward pass once it has what it came for."""


def decoder_layers(model) -> torch.nn.ModuleList:
    return causal_lm(model).get_decoder().layers


def _hidden_states(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_kwargs(model, seq_len: int, device: str = "cpu") -> list[dict]:
    """The keyword arguments the model passes each decoder layer for a window of `seq_len` tokens."""
    layers, captured = decoder_layers(model), []
    handles = [layer.register_forward_pre_hook(lambda module, args, kwargs: captured.append(dict(kwargs)), with_kwargs=True)
               for layer in layers]
    try:
        with torch.no_grad():
            causal_lm(model).get_decoder()(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def kwargs_to(kwargs: dict, device: str) -> dict:
    """A layer's keyword arguments with every tensor (also inside tuples, as rotary tables come, and dicts) on `device`."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return {name: move(value) for name, value in kwargs.items()}


def layer_inputs(model, input_ids: torch.Tensor, device: str = "cpu", batch_size: int = FORWARD_BATCH) -> torch.Tensor:
    """float32 [n, seq, hidden] on the CPU: the input of the first decoder layer (embeddings, scaled as the model does)."""
    first, chunks = decoder_layers(model)[0], []

    def capture(module, args, kwargs):
        chunks.append(_hidden_states(args, kwargs).detach().float().cpu())
        raise _Captured

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                try:
                    causal_lm(model).get_decoder()(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return torch.cat(chunks)


def run_layer(layer, hidden: torch.Tensor, kwargs: dict, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The layer's output for `hidden`, with some parameters replaced (layer-relative names) when `weights` is given."""
    if weights:
        out = torch.func.functional_call(layer, weights, (hidden,), kwargs)
    else:
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns (hidden, ...)


def layer_outputs(layer, inputs: torch.Tensor, kwargs: dict, device: str = "cpu", batch_size: int = FORWARD_BATCH) -> torch.Tensor:
    """float32 [n, seq, hidden] on the CPU: the layer applied to every cached window."""
    with torch.no_grad():
        return torch.cat([run_layer(layer, inputs[start : start + batch_size].to(device), kwargs).float().cpu()
                          for start in range(0, inputs.shape[0], batch_size)])


def output_error_sums(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w · (outputs - targets)², Σ w) with `weights` per position [n, seq] (a counted mask, or floats) or per
    element [n, seq, hidden]: summed over chunks of windows, their ratio is the whole set's error."""
    if weights.ndim == outputs.ndim - 1:
        weights = weights[..., None].expand_as(outputs)
    weights = weights.to(outputs.dtype)
    return ((outputs - targets) ** 2 * weights).sum(), weights.sum()


def output_error(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error (over the counted positions and every hidden unit when `weights` is the counted
    mask): the loss block reconstruction minimises."""
    squared, total = output_error_sums(outputs, targets, weights)
    return squared / total.clamp_min(torch.finfo(squared.dtype).tiny)


def local_block_errors(teacher, student, input_ids: torch.Tensor, device: str = "cpu") -> list[float]:
    """Per decoder block, over every position of these windows: the mean squared error of the student's block output
    against the teacher's block applied to the same input (the student's own, earlier blocks as quantized): the error
    `reconstruct` lowers on its calibration windows (--target local, --weighting mse), here on any text. Both models on
    `device`."""
    seq_len, counted = input_ids.shape[1], torch.ones(input_ids.shape, dtype=torch.bool)
    teacher_kwargs, student_kwargs = layer_kwargs(teacher, seq_len, device), layer_kwargs(student, seq_len, device)
    inputs, errors = layer_inputs(student, input_ids, device), []
    for index, (teacher_layer, layer) in enumerate(zip(decoder_layers(teacher), decoder_layers(student))):
        outputs = layer_outputs(layer, inputs, student_kwargs[index], device)
        targets = layer_outputs(teacher_layer, inputs, teacher_kwargs[index], device)
        errors.append(float(output_error(outputs, targets, counted)))
        inputs = outputs
    return errors


def block_output_fisher(model, input_ids: torch.Tensor, counted: torch.Tensor, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Per decoder block, float32 [n, seq, hidden] on the CPU: the squared gradient of the model's log-likelihood with
    respect to that block's output, labels sampled from the model itself (the true Fisher's diagonal, as
    recovery/fisher.py takes it for the weights), one backward pass per window.

    ½ Σ F Δ² is the KL a perturbation Δ of a block's output costs to second order (BRECQ, arXiv 2102.05426, weighs its
    block reconstruction so), where a plain MSE counts every hidden unit and token alike: in SmolLM2 a few tokens and
    channels carry activations a hundred times the others (attention sinks), and the MSE is all theirs.
    """
    layers = decoder_layers(model)
    outputs: list[torch.Tensor] = []

    def keep(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden.retain_grad()
        outputs.append(hidden)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    hidden_size = causal_lm(model).config.hidden_size
    fisher = [torch.zeros(*input_ids.shape, hidden_size) for _ in layers]
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    try:
        for i in range(input_ids.shape[0]):
            rows = counted[i].to(torch.bool)
            if not rows.any():  # no counted token: no log-likelihood, a zero Fisher
                continue
            outputs.clear()
            # The graph starts at the embeddings (the weights take no gradient), so every block output gets one.
            embeddings = causal_lm(model).get_input_embeddings()(input_ids[i : i + 1].to(device)).detach().requires_grad_(True)
            logits = causal_lm(model)(inputs_embeds=embeddings, use_cache=False).logits[0].float()
            log_probs = torch.log_softmax(logits[rows.to(device)], dim=-1)
            labels = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(device)
            (-log_probs.gather(1, labels).sum()).backward()
            for block, hidden in enumerate(outputs):
                fisher[block][i] = hidden.grad[0].float().pow(2).cpu()
    finally:
        for handle in handles:
            handle.remove()
    return fisher
