"""GPTQ codes for llama.cpp's Q2_K blocks: the same scales and bytes, codes chosen with error feedback.

llama.cpp's quantizer (with an importance matrix) chooses each Q2_K sub-block's scale and min, then
rounds every weight to its nearest 2-bit code: one weight's rounding error is never made up by the
next. GPTQ (Frantar et al., arXiv 2210.17323) rounds one input column at a time and spreads that
column's error over the columns not yet rounded, through the inverse of the inputs' Gram matrix XᵀX,
so it minimises the error of the layer's *outputs* ‖X Wᵀ − X Qᵀ‖² instead of each weight's. Here the
scales and mins llama.cpp chose stay as they are (static groups, so any column order works: columns are
taken by decreasing E[x²]) and only the 2-bit codes change — the file keeps its tensor types, bytes and
decode speed, and stock llama.cpp reads it. With the identity for XᵀX it gives back llama.cpp's codes
(a test checks this).

The target is the teacher's weight, and the statistics come from the same teacher text as the
importance matrix. Tried by hand and left out: merging a trained gate/up LoRA through GPTQ (target the
2-bit weight plus (α/r)·B·A, or the teacher's plus it) kept less of the adapter's gain than this file
alone gives (default model, held-out KL 0.398 and 0.378 against 0.354). Also tried by hand, same held-out
text: GPTQ layer by layer on the partly quantized student's inputs (XᵀX of the student's, target the
teacher's weight): 0.354 / perplexity 10.83 against 0.354 / 10.99 — no better than 512 samples here
(0.353 / 10.86); the asymmetric target ‖W X_teacher − Q X_student‖ (W·X_tᵀX_s·(X_sᵀX_s)⁻¹ as the
target) overfits the calibration text: KL 2.73 (0.51 with half the correction); re-fitting each
sub-block's scale and min by least squares under XᵀX between GPTQ passes: output error 0.73 → 0.70
of llama.cpp's, but held-out KL 0.371 (perplexity 10.82).

Example:
    refine_codes("out/gateup.gguf", "out/gateup.gptq.gguf", samples="out/synth", max_samples=128)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks import Q2KBlocks
from recover_lora.fileio import atomic_output, check_output

DEFAULT_DAMP = 0.01  # of the mean diagonal of XᵀX, added to it (GPTQ's default): keeps the inverse stable
DEFAULT_SAMPLES = 128  # synthetic samples XᵀX comes from: the importance matrix's, in² per layer input
# torch is imported inside the functions: the CLI reads the defaults above without loading it.


@dataclass
class CodesResult:
    path: Path
    tensors: list[str] = field(default_factory=list)  # GGUF names whose codes were chosen here
    codes_changed: float = 0.0  # share of the 2-bit codes that differ from the base's
    error_ratio: float = 1.0  # Σ‖X(W − Q_new)ᵀ‖² / Σ‖X(W − Q_base)ᵀ‖² over those tensors, on the calibration text


def gptq_codes(
    target: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    gram: torch.Tensor,
    damp: float = DEFAULT_DAMP,
    block: int = 128,
) -> torch.Tensor:
    """2-bit codes [rows, cols] (uint8) for weights `target` ≈ scale · code − minimum, by GPTQ.

    Args:
        target: float64 [rows, cols], the weight to represent (cols = the layer's inputs).
        scale, minimum: float64 [rows, cols], each weight's sub-block scale and min (fixed).
        gram: float64 [cols, cols], Σ x xᵀ of the layer's inputs (any positive multiple).
        damp: added to the diagonal, as a fraction of its mean.
        block: columns updated together (speed only; the result does not depend on it).
    """
    import torch

    rows, cols = target.shape
    weights, gram = target.clone(), gram.clone()
    dead = torch.diag(gram) == 0  # inputs that never fire (width padding): their weights do not matter
    gram[dead, dead] = 1.0
    weights[:, dead] = 0.0
    order = torch.argsort(torch.diag(gram), descending=True, stable=True)
    weights, scale, minimum, gram = weights[:, order], scale[:, order], minimum[:, order], gram[order][:, order]
    gram += damp * torch.mean(torch.diag(gram)) * torch.eye(cols, dtype=gram.dtype)
    # GPTQ's trick: the upper Cholesky factor of (XᵀX)⁻¹ holds every update the column-by-column pass needs.
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(gram)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    usable = scale > 0  # a sub-block of scale 0 holds -min whatever its codes: code 0
    step = torch.where(usable, scale, torch.ones_like(scale))
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        chunk, errors = weights[:, start:stop].clone(), torch.zeros(rows, stop - start, dtype=weights.dtype)
        factor = upper[start:stop, start:stop]
        for i in range(stop - start):
            c = start + i
            code = torch.clamp(torch.round((chunk[:, i] + minimum[:, c]) / step[:, c]), 0, Q2KBlocks.MAX_CODE)
            code = torch.where(usable[:, c], code, torch.zeros_like(code))
            codes[:, c] = code.to(torch.uint8)
            error = (chunk[:, i] - (scale[:, c] * code - minimum[:, c])) / factor[i, i]
            chunk[:, i:] -= error[:, None] * factor[i, i:][None, :]
            errors[:, i] = error
        weights[:, stop:] -= errors @ upper[start:stop, stop:]
    return codes[:, torch.argsort(order)]


def output_error(target: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ over the calibration inputs of ‖x (target − quantized)ᵀ‖² = tr(E · XᵀX · Eᵀ)."""
    import torch

    error = target - quantized
    return float(torch.einsum("ij,jk,ik->", error, gram, error))


def per_weight(values: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """[n_blocks, 16] sub-block values -> float64 [rows, cols], one per weight."""
    import torch

    per_sub_block = Q2KBlocks.WEIGHTS_PER_SUB_BLOCK
    return torch.from_numpy(values.astype(np.float64)).reshape(rows, cols // per_sub_block).repeat_interleave(per_sub_block, dim=1)


def with_gptq_codes(blocks: Q2KBlocks, shape: tuple[int, int], target: torch.Tensor, gram: torch.Tensor,
                    damp: float = DEFAULT_DAMP) -> Q2KBlocks:
    """The same blocks (scales, mins, d, dmin) with codes chosen by GPTQ for `target`."""
    rows, cols = shape
    scale, minimum = blocks.sub_block_scales()
    codes = gptq_codes(target, per_weight(scale, rows, cols), per_weight(minimum, rows, cols), gram, damp)
    return Q2KBlocks(codes=codes.numpy().reshape(-1, Q2KBlocks.SUB_BLOCKS, Q2KBlocks.WEIGHTS_PER_SUB_BLOCK), scale_codes=blocks.scale_codes.copy(),
                     min_codes=blocks.min_codes.copy(), d=blocks.d.copy(), dmin=blocks.dmin.copy())


def input_grams(teacher, modules: list[str], input_ids: torch.Tensor, counted: torch.Tensor, batch_size: int = 8,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """Module name -> float64 Σ x xᵀ of its inputs over the counted positions (the teacher's own text)."""
    import torch

    from recover_lora.recovery.activations import collect_activation_stats, token_batches

    stats = collect_activation_stats(teacher, token_batches(input_ids, counted, batch_size), modules=modules,
                                     covariance=modules, device=device)
    return {name: torch.from_numpy(s.xtx) for name, s in stats.items()}


def q2k_tensor_names(tensor_types: dict[str, gguf.GGMLQuantizationType]) -> list[str]:
    return sorted(n for n, t in tensor_types.items() if t == gguf.GGMLQuantizationType.Q2_K)


def refine_codes(
    base_gguf: str | Path,
    out_path: str | Path,
    samples: str | Path,
    teacher: str | Path | None = None,
    max_samples: int | None = DEFAULT_SAMPLES,
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    device: str = "cpu",
    force: bool = False,
) -> CodesResult:
    """A copy of a GGUF whose Q2_K tensors hold GPTQ codes for the teacher's weights; every other byte unchanged.

    Args:
        base_gguf: a GGUF with Q2_K linears (e.g. `export --policy gateup --imatrix ...`).
        out_path: the GGUF to write (temporary file, checked, renamed).
        samples: a `recover-lora synth` folder: the teacher's own text (never held-out text).
        teacher: the full-precision model the base was exported from (None = the default model).
        max_samples: use the first N samples (XᵀX is in² per layer input; 128 samples are plenty).
        damp: GPTQ's diagonal damping, a fraction of the mean diagonal.
    """
    import torch

    from recover_lora.export.llama_load import llama_cpp_load_check
    from recover_lora.export.model import hf_module_name
    from recover_lora.export.quantize import check_types
    from recover_lora.recovery.activations import counted_positions, decoder_linears
    from recover_lora.export.gguf_header import read_gguf_header
    from recover_lora.recovery.block_scales import q2k_tensor
    from recover_lora.recovery.imatrix import padded_teacher
    from recover_lora.recovery.merge import replace_tensor_bytes
    from recover_lora.recovery.samples import load_samples
    from recover_lora.recovery.student import read_student_info

    base_gguf = Path(base_gguf)
    if not base_gguf.is_file():
        raise RecoverLoraError(f"base GGUF {base_gguf} does not exist; export one first (recover-lora export --policy gateup)")
    if max_samples is not None and max_samples <= 0 or not damp > 0:
        raise RecoverLoraError(f"--max-samples={max_samples} and --damp={damp} must be > 0")
    out_path = check_output(out_path, force)
    info = read_student_info(base_gguf)
    names = q2k_tensor_names(info.tensor_types)
    if not names:
        raise RecoverLoraError(f"{base_gguf.name} has no Q2_K tensors; GPTQ codes are for a Q2_K policy (export --policy gateup)")
    loaded = load_samples(samples)
    ids, counted = loaded.input_ids[:max_samples], counted_positions(loaded.loss_mask[:max_samples])
    # Padded as the base was (the GGUF records the widths it padded), so names and widths line up.
    model, config = padded_teacher(teacher, "auto" if info.unpadded else "none", device=device)
    if int(ids.max()) >= config.vocab_size:
        raise RecoverLoraError(f"the samples reach token id {int(ids.max())} but the teacher's vocabulary has {config.vocab_size}: they come from another model")
    modules = {name: hf_module_name(name, info.config) for name in names}
    linears = decoder_linears(model)
    for name, module in modules.items():
        if module not in linears:
            raise RecoverLoraError(f"{name} is Q2_K but not a linear layer of the decoder blocks; GPTQ codes cover those only")
        wanted = info.tensor_shapes[name]
        found = tuple(linears[module].weight.shape)
        if found != wanted:
            raise RecoverLoraError(f"{name}: the teacher's weight is {found} but {base_gguf.name} holds {wanted}; "
                                   f"give the --teacher {base_gguf.name} was exported from")
    grams = input_grams(model, sorted(set(modules.values())), ids, counted, batch_size, device)

    replacements, changed, total, before, after = {}, 0, 0, 0.0, 0.0
    tensors = {t.name: t for t in read_gguf_header(base_gguf).tensors}  # the header once, not per tensor
    for name, module in modules.items():
        blocks, shape = q2k_tensor(tensors, name, base_gguf)
        target = linears[module].weight.detach().to(torch.float64).cpu()
        gram = grams[module]
        new = with_gptq_codes(blocks, shape, target, gram, damp)
        changed += int((new.codes != blocks.codes).sum())
        total += blocks.codes.size
        before += output_error(target, torch.from_numpy(blocks.dequantize().astype(np.float64)).reshape(shape), gram)
        after += output_error(target, torch.from_numpy(new.dequantize().astype(np.float64)).reshape(shape), gram)
        replacements[name] = new.to_bytes()
    del model, grams
    with atomic_output(out_path, force=force) as tmp:
        replace_tensor_bytes(base_gguf, tmp, replacements)
        check_types(tmp, info.tensor_types)
        llama_cpp_load_check(tmp, name=str(out_path))
    return CodesResult(path=out_path, tensors=names, codes_changed=changed / max(total, 1), error_ratio=after / before if before else 1.0)
