"""Synthetic training text written by the teacher itself (no labels, no dataset).

The recipe is LLM-QAT's data-free generation: each sample starts from one token drawn uniformly
from the vocabulary (special/control tokens excluded), the teacher then picks its next few tokens
greedily (so the start is something the teacher believes in, not noise) and samples the rest with
temperature and top-p. For instruct models there is a second start: a generic user prompt rendered
with the model's chat template, so the samples look like the assistant answers the model is used for.

Generation is batched with the KV cache (our own loop over `past_key_values`, so the greedy-then-
sample schedule and the EOS handling are exactly the recipe). Each batch is a shard with its own
seed derived from (seed, shard index) and is written to disk atomically, so a killed run resumes
where it stopped and gives the same tokens as an uninterrupted one. The on-disk format is samples.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, sha256_file
from recover_lora.recovery import samples as fmt
from recover_lora.recovery.synth_config import SynthConfig
from recover_lora.recovery.synth_tokenizer import TokenizerInfo

DUPLICATE_WINDOW_TOKENS = 32
TOP_P_CANDIDATES = 1024  # tokens looked at before falling back to a full sort (see _sample_top_p)
PARTIAL_DIR = ".partial"
RUN_FILE = "run.json"


def shard_seed(seed: int, shard: int) -> int:
    """An independent 63-bit seed for one shard, the same whichever shards ran before it."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names, dtypes, shapes and raw bytes: the teacher's identity when no file is given."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # The nucleus is a prefix of the tokens sorted by probability. Sorting a 50k vocabulary per step
    # costs about half a CPU forward pass, so take the top candidates first and fully sort only the
    # rows whose nucleus is wider than them: the kept set is exactly the same either way.
    token = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    top_probs, top_order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    wide = top_probs.sum(-1) < top_p
    narrow = ~wide
    if bool(narrow.any()):
        token[narrow] = _draw_from_nucleus(top_probs[narrow], top_order[narrow], top_p, generator)
    if bool(wide.any()):
        token[wide] = _draw_from_nucleus(*probs[wide].sort(dim=-1, descending=True), top_p, generator)
    return token


def _draw_from_nucleus(sorted_probs: torch.Tensor, order: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
    return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)


@torch.inference_mode()
def sample_batch(
    teacher: torch.nn.Module,
    starts: Sequence[Sequence[int]],
    config: SynthConfig,
    tokenizer: TokenizerInfo,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each start (fixed tokens) to ``config.seq_len`` tokens with the KV cache.

    Returns ``input_ids`` int64 [B, L] and ``loss_mask`` bool [B, L] (meaning in samples.py).
    The first ``greedy_tokens`` continuations are the argmax, the rest temperature/top-p samples.
    Starts of different lengths are left-padded while generating; the padding is not in the output.
    """
    device = generator.device
    seq_len, batch = config.seq_len, len(starts)
    lengths = torch.tensor([len(s) for s in starts], device=device)
    width = int(lengths.max())
    pad_id = tokenizer.eos_ids[0]
    prompt = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    for row, start in enumerate(starts):
        prompt[row, width - len(start):] = torch.tensor(start, dtype=torch.long, device=device)
    attention = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    eos_ids = torch.tensor(tokenizer.eos_ids, device=device)
    padded = bool((lengths != width).any())  # no mask needed when every start has the same length

    out = teacher(
        input_ids=prompt, attention_mask=attention.long() if padded else None, position_ids=positions,
        use_cache=True, logits_to_keep=1,
    )
    steps = seq_len - int(lengths.min())
    generated = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    position = positions[:, -1:]
    for step in range(steps):
        logits = out.logits[:, -1, : tokenizer.vocab_size].float()
        if config.eos == "suppress":
            logits[:, eos_ids] = float("-inf")
        if step < config.greedy_tokens:
            token = logits.argmax(-1)
        else:
            token = _sample_top_p(logits, config.temperature, config.top_p, generator)
        token = torch.where(finished, pad_id, token)
        generated[:, step] = token
        finished |= torch.isin(token, eos_ids)
        if step == steps - 1 or bool(finished.all()):
            break
        position = position + 1
        if padded:
            attention = torch.cat([attention, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        out = teacher(
            input_ids=token[:, None], attention_mask=attention.long() if padded else None, position_ids=position,
            past_key_values=out.past_key_values, use_cache=True,
        )

    input_ids = torch.empty((batch, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_len), dtype=torch.bool)
    generated, lengths_cpu = generated.cpu(), lengths.cpu().tolist()
    for row, start in enumerate(starts):
        n_start = lengths_cpu[row]
        tail = generated[row, : seq_len - n_start]
        input_ids[row, :n_start] = torch.tensor(start, dtype=torch.long)
        input_ids[row, n_start:] = tail
        hits = torch.isin(tail, eos_ids.cpu()).nonzero()
        end = n_start + int(hits[0]) if len(hits) else seq_len  # index of the first EOS
        loss_mask[row, n_start - 1 : end] = True  # the last start token predicts the first generated one
    return input_ids, loss_mask


def _shard_starts(config: SynthConfig, tokenizer: TokenizerInfo, rows: int, generator: torch.Generator) -> list[list[int]]:
    device = generator.device
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if config.first_token == "chat":
        picks = torch.randint(len(tokenizer.chat_prompts), (rows,), generator=generator, device=device)
        return [list(tokenizer.chat_prompts[int(i)]) for i in picks]
    allowed = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    allowed[list(tokenizer.excluded_ids) + list(tokenizer.eos_ids)] = False  # a sample never starts at its end
    allowed_ids = allowed.nonzero().squeeze(-1).to(device)
    picks = torch.randint(len(allowed_ids), (rows,), generator=generator, device=device)
    return [prefix + [int(allowed_ids[i])] for i in picks]


def duplicate_rate(input_ids: torch.Tensor, loss_mask: torch.Tensor, window: int = DUPLICATE_WINDOW_TOKENS) -> float:
    """Fraction of samples whose first ``window`` tokens (from the start of the trained span, so chat
    templates do not count) equal those of another sample."""
    n, seq_len = input_ids.shape
    if n < 2:
        return 0.0
    start = loss_mask.long().argmax(-1, keepdim=True)  # first trained position: the random token or last prompt token
    index = start + torch.arange(window)[None, :]
    windows = torch.where(index < seq_len, input_ids.gather(1, index.clamp(max=seq_len - 1)), -1)
    _, inverse, counts = torch.unique(windows, dim=0, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean())


def check_tokenizer(config: SynthConfig, tokenizer: TokenizerInfo) -> None:
    """Refuse settings the tokenizer cannot serve (chat mode without a chat template, prompts too long)."""
    if config.first_token != "chat":
        return
    if not tokenizer.chat_prompts:
        raise RecoverLoraError(f"tokenizer {tokenizer.name!r} has no chat template; use first_token='random' (--mode random)")
    longest = max(len(p) for p in tokenizer.chat_prompts)
    if longest >= config.seq_len:
        raise RecoverLoraError(
            f"seq_len={config.seq_len} is not longer than the longest chat prompt ({longest} tokens); raise --seq-len"
        )


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / PARTIAL_DIR / f"shard-{shard:06d}.safetensors"


def _prepare_out_dir(out_dir: Path, run: dict, resume: bool, force: bool) -> None:
    """Check the folder's state against the flags; on resume, check the settings are the same."""
    partial = out_dir / PARTIAL_DIR
    outputs = [out_dir / name for name in (fmt.SAMPLES_FILE, fmt.MANIFEST_FILE, fmt.PREVIEW_FILE)]
    if force:
        for path in outputs:
            path.unlink(missing_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    if (out_dir / fmt.MANIFEST_FILE).exists() and not resume:
        raise RecoverLoraError(f"{out_dir} already holds a finished synthetic set; pass --force to make a new one")
    previous_file = partial / RUN_FILE if partial.exists() else out_dir / fmt.MANIFEST_FILE
    if previous_file.exists():
        if not resume:
            done = len(list(partial.glob("shard-*.safetensors")))
            raise RecoverLoraError(
                f"{out_dir} holds an unfinished run ({done} shards done); pass --resume to continue it or --force to start over"
            )
        previous = json.loads(previous_file.read_text())
        for key in ("settings", "teacher", "tokenizer"):
            if previous.get(key) != run[key]:
                changed = sorted(k for k in run[key] if previous.get(key, {}).get(k) != run[key][k])
                raise RecoverLoraError(
                    f"{out_dir} was started with different {key} ({', '.join(changed) or 'fields'} differ); "
                    "resume with the same settings or pass --force to start over"
                )
    elif any(path.exists() for path in outputs):
        raise RecoverLoraError(f"{out_dir} holds synthetic-set files but no manifest; pass --force to start over")


def generate_synthetic(
    teacher: torch.nn.Module,
    out_dir: str | Path,
    tokenizer: TokenizerInfo,
    *,
    teacher_id: dict | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    preview_samples: int = 50,
    on_shard_written: Callable[[int], None] | None = None,
    **settings,
) -> dict:
    """Let ``teacher`` write ``n_samples`` × ``seq_len`` tokens into ``out_dir``; return the manifest.

    Args:
        teacher: a transformers causal LM in torch, already on its device and dtype.
        tokenizer: `TokenizerInfo` (EOS, excluded ids, chat prompts, decoder for the preview).
        settings: `SynthConfig` fields (n_samples, seq_len, seed, batch_size, ...); the rest keep its defaults.
        teacher_id: e.g. ``{"name": "SmolLM2-135M-Instruct", "sha256": <file hash>}``; default: a
            hash of the state dict.
        resume / force: continue an interrupted run in ``out_dir`` / throw away what is there.
        on_shard_written: called with each shard index once it is on disk (tests use it to simulate a kill).

    Example:
        manifest = generate_synthetic(model, "runs/synth", TokenizerInfo.from_hf(tok, "smollm2"), n_samples=64)
    """
    config = SynthConfig.from_settings(settings)
    check_tokenizer(config, tokenizer)
    teacher_vocab = teacher.config.vocab_size
    if tokenizer.vocab_size > teacher_vocab:
        raise RecoverLoraError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the teacher only {teacher_vocab} logits; "
            "pair the teacher with its own tokenizer"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parameter = next(teacher.parameters())
    if not teacher_id:
        teacher_id = {"name": type(teacher).__name__, "state_dict_sha256": state_dict_sha256(teacher)}
    run = {
        "format_version": fmt.FORMAT_VERSION,
        "settings": asdict(config),
        "teacher": dict(teacher_id),
        "tokenizer": tokenizer.identity(),
    }
    _prepare_out_dir(out_dir, run, resume, force)
    if (out_dir / fmt.MANIFEST_FILE).exists():  # resumed a finished run with the same settings
        shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)  # killed after the manifest, before cleanup
        return fmt.read_manifest(out_dir)
    partial = out_dir / PARTIAL_DIR
    partial.mkdir(exist_ok=True)
    if not (partial / RUN_FILE).exists():
        with atomic_output(partial / RUN_FILE) as tmp:
            tmp.write_text(json.dumps(run, indent=2, sort_keys=True))

    teacher.eval()
    todo = [k for k in range(config.n_shards) if not _shard_path(out_dir, k).exists()]
    done_rows = config.n_samples - sum(config.shard_rows(k) for k in todo)
    with tqdm(total=config.n_samples, initial=done_rows, unit="sample", desc="synth", disable=not progress, dynamic_ncols=True) as bar:
        for shard in todo:
            began = time.perf_counter()
            generator = torch.Generator(device=parameter.device).manual_seed(shard_seed(config.seed, shard))
            starts = _shard_starts(config, tokenizer, config.shard_rows(shard), generator)
            input_ids, loss_mask = sample_batch(teacher, starts, config, tokenizer, generator)
            seconds = time.perf_counter() - began
            fmt.write_token_file(_shard_path(out_dir, shard), input_ids, loss_mask, {"seconds": f"{seconds:.6f}"})
            bar.update(len(starts))
            if on_shard_written is not None:
                on_shard_written(shard)
    return _finish(out_dir, config, run, tokenizer, preview_samples, device=str(parameter.device), dtype=str(parameter.dtype))


def _finish(
    out_dir: Path, config: SynthConfig, run: dict, tokenizer: TokenizerInfo, preview_samples: int, device: str, dtype: str
) -> dict:
    """Merge the shards into the final files (manifest last), then drop the shards."""
    ids_parts, mask_parts, seconds = [], [], 0.0
    for shard in range(config.n_shards):
        path = _shard_path(out_dir, shard)
        ids, mask = fmt.read_token_file(path)
        expected = (config.shard_rows(shard), config.seq_len)
        if ids.shape != expected:
            raise RecoverLoraError(f"{path} holds {tuple(ids.shape)} tokens, expected {expected}; delete it and --resume")
        with safe_open(str(path), "pt") as f:
            seconds += float((f.metadata() or {}).get("seconds", 0.0))
        ids_parts.append(ids)
        mask_parts.append(mask)
    input_ids, loss_mask = torch.cat(ids_parts), torch.cat(mask_parts)
    ended_early = ~loss_mask[:, -1]
    # overwrite=True: a run killed while finishing left these behind; the shards are the truth.
    fmt.write_token_file(out_dir / fmt.SAMPLES_FILE, input_ids, loss_mask, overwrite=True)

    preview = []
    for row in range(min(preview_samples, len(input_ids))):
        # The mask ends just before the first EOS: keep through that EOS, drop the padding after it.
        last_trained = config.seq_len - 1 - int(loss_mask[row].flip(0).long().argmax())
        kept = input_ids[row, : last_trained + 2].tolist()
        entry = {"index": row, "ended_early": bool(ended_early[row]), "n_loss_tokens": int(loss_mask[row].sum())}
        entry.update({"text": tokenizer.decode(kept)} if tokenizer.decode else {"ids": kept})
        preview.append(entry)
    fmt.write_preview(out_dir, preview, overwrite=True)

    n_tokens = input_ids.numel()
    manifest = {
        **run,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {
            "n_samples": config.n_samples,
            "seq_len": config.seq_len,
            "n_shards": config.n_shards,
            "n_tokens": n_tokens,
            "n_loss_tokens": int(loss_mask.sum()),
            "loss_token_fraction": float(loss_mask.sum()) / n_tokens,
        },
        "early_eos": {"count": int(ended_early.sum()), "fraction": float(ended_early.float().mean())},
        "duplicate_rate": duplicate_rate(input_ids, loss_mask),
        "duplicate_window_tokens": DUPLICATE_WINDOW_TOKENS,
        "timing": {
            "generation_seconds": round(seconds, 3),
            "samples_per_s": round(config.n_samples / seconds, 3) if seconds else None,
            "device": device,
            "dtype": dtype,
        },
        "loss_mask": fmt.LOSS_MASK_MEANING,
        "samples_sha256": sha256_file(out_dir / fmt.SAMPLES_FILE),
    }
    fmt.write_manifest(out_dir, manifest, overwrite=True)
    shutil.rmtree(out_dir / PARTIAL_DIR, ignore_errors=True)
    return manifest


def synthesize(model: str | None, out: Path, device_name: str, resume: bool, force: bool, progress: bool = True,
               **settings) -> dict:
    """Build the teacher from `model` (None: the default model) and let it write the synthetic set into `out`.

    `settings` are `SynthConfig` fields (n_samples, seq_len, seed, batch_size, ...); the rest keep its defaults.

    Example:
        synthesize(None, Path("runs/synth"), "auto", resume=True, force=False, n_samples=512, seq_len=128)
    """
    from recover_lora.export.sources import DEFAULT_MODEL_NAME, default_model_path, load_model, resolve_named
    from recover_lora.export.torch_model import to_hf_model
    from recover_lora.recovery.teacher_source import load_hf_tokenizer, pick_device_and_dtype, teacher_source_identity

    config = SynthConfig.from_settings(settings)  # bad settings fail before anything loads
    device, dtype = pick_device_and_dtype(device_name)
    source = resolve_named(model) if model is not None else default_model_path()
    if not source.exists():
        raise RecoverLoraError(f"model source {source} does not exist; give a Hugging Face folder, a .gguf file, or nothing")
    weights = load_model(model)  # reads the config and checks the tensors; the weights load lazily
    name = DEFAULT_MODEL_NAME if model is None else weights.config.name
    extra_eos = [weights.config.eos_token_id] if weights.config.eos_token_id is not None else []
    tokenizer = TokenizerInfo.from_hf(load_hf_tokenizer(source), name=name, extra_eos_ids=extra_eos)
    check_tokenizer(config, tokenizer)  # before building the teacher in torch
    teacher = to_hf_model(weights, dtype=dtype, device=str(device))
    identity = {**teacher_source_identity(source), "name": name}
    return generate_synthetic(teacher, out, tokenizer, teacher_id=identity, resume=resume, force=force, progress=progress,
                              **asdict(config))
