"""`train` on several processes (`accelerate launch`, `torchrun`): FSDP2 sharding, one global batch, full checkpoints.

One process (WORLD_SIZE unset or 1) never comes here: `train` runs exactly as before, with no
process group. With N processes:
- The student is sharded with torch's FSDP2 `fully_shard`: each decoder layer is one unit and the
  decoder (final norm included) the root. The token embedding and output head stay whole on every
  process (`ignored_params`): they are frozen, so they need no gradient reduction, and the chunked
  loss (`--loss-chunk`) calls lm_head outside the decoder's forward. The teacher is a replica per
  process; the top-k cache is computed by rank 0 while the others wait, then read by them.
- Every step's global batch (`distill.batch_rows`) is cut into N equal slices, one per process.
  Each process's loss is its *share* of the global mean (its rows' mean times its fraction of the
  batch's loss rows), so the shares sum to the one-process loss; FSDP averages gradients over the
  N processes, hence the backward pass runs on N times the share.
- Checkpoints keep the one-process format: `torch.distributed.checkpoint.state_dict` gathers whole
  tensors (full_state_dict=True), the optimizer state is re-keyed by index as
  `optimizer.state_dict()` keys it, and rank 0 writes it. Every process's RNG state is kept too
  (dropout draws differ per process), so a resume with the same process count is bit-identical.
- Only rank 0 writes files. A rank that fails exits; the launcher (torchrun's elastic agent, which
  `accelerate launch` uses too) then stops the others, so nothing waits at a barrier for ever.

Accelerate's FSDP plugin is not used: accelerate only turns FSDP on for GPUs and the like (on a CPU
it silently falls back to DDP), and one code path on CPU and GPU is the one the tests exercise.
Accelerate's `PartialState` starts the process group (gloo on CPU, NCCL on CUDA) and picks the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery import checkpoint as ckpt


def world_size() -> int:
    """The number of processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(batch_size: int, device: torch.device):
    """accelerate's PartialState of this process, or None for a single process (nothing is started then)."""
    processes = world_size()
    if processes == 1:
        return None
    if batch_size % processes:
        raise RecoverLoraError(f"--batch-size={batch_size} does not divide by the {processes} processes; "
                               f"give a multiple of {processes}")
    if device.type not in ("cpu", "cuda"):
        raise RecoverLoraError(f"several processes run on --device cuda or cpu, not {device.type}")
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def local_rows(index: torch.Tensor, processes) -> torch.Tensor:
    """This process's slice of a step's global batch rows."""
    per_process = len(index) // processes.num_processes
    return index[processes.process_index * per_process : (processes.process_index + 1) * per_process]


def shard_student(model) -> None:
    """FSDP2 in place: every decoder layer a unit, the decoder the root, the embeddings whole."""
    from torch.distributed.fsdp import fully_shard

    from recover_lora.recovery.student import causal_lm

    lm = causal_lm(model)
    decoder = lm.get_decoder()
    whole = {p for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) for p in m.parameters()}
    if any(p.requires_grad for p in whole):
        raise RecoverLoraError("several processes cannot train the embeddings or lm_head; target the block linears")
    for layer in decoder.layers:
        fully_shard(layer)
    # The decoder, not the peft wrapper, is the root: the chunked loss runs it without the wrapper's forward.
    fully_shard(decoder, ignored_params=whole)


def row_counts(mask: torch.Tensor) -> dict[str, int]:
    """Rows each loss part averages over: KL every loss row; cross-entropy those with a next token
    (the last position has none: losses.next_token_rows)."""
    return {"kl": int(mask.sum()), "ce": int(mask[:, :-1].sum())}


def share_of_global_mean(parts: dict, loss_config, mask: torch.Tensor, global_mask: torch.Tensor):
    """(loss, parts) of this process's rows as shares of the global batch's means: summed over
    processes, they are the one-process loss and parts (each part weighted by its row count)."""
    local, total = row_counts(mask), row_counts(global_mask)
    shares = {name: value * (local[name] / total[name]) if local[name] else torch.zeros_like(value)
              for name, value in parts.items()}
    weights = {"kl": loss_config.kl_weight, "ce": loss_config.ce_weight}
    loss = sum(weights[name] * share for name, share in shares.items())
    return loss, shares


def sum_over_processes(loss: torch.Tensor, parts: dict):
    """The global loss and parts to log: sums of every process's shares (numbers to report, not gradients)."""
    values = torch.stack([loss.detach().float(), *(part.detach().float() for part in parts.values())])
    torch.distributed.all_reduce(values)
    return values[0], dict(zip(parts, values[1:]))


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from FSDP's replicated DTensor results (clip_grad_norm_'s total norm)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _optimizer_order(model, optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (group by group)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_trainable_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """(trainable parameters by name, optimizer state keyed like `optimizer.state_dict()`) as whole CPU
    tensors. Every process must call it (it gathers); only rank 0 receives the values, others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    gathered = get_model_state_dict(model, options=options)
    # In `checkpoint.trainable_state`'s order, without the frozen tied lm_head that comes along.
    parameters = {name: gathered[name] for name, p in model.named_parameters() if p.requires_grad and name in gathered}
    if optimizer is None:
        return parameters, None
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:  # not rank 0
        return parameters, {}
    index = {name: i for i, name in enumerate(_optimizer_order(model, optimizer))}
    return parameters, {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [group | {"params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]],
    }


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trajectory: dict, metrics: dict, processes) -> None:
    """`checkpoint.save_checkpoint` for a sharded run: the same file, with every process's RNG state added."""
    parameters, optimizer_state = full_trainable_state(model, optimizer)
    rngs = [None] * processes.num_processes
    torch.distributed.all_gather_object(rngs, ckpt.rng_state())
    if processes.is_main_process:
        state = ckpt.checkpoint_state(step, parameters, optimizer_state, scheduler.state_dict(), rngs[0], trajectory, metrics)
        ckpt.write_checkpoint(run_dir, state | {"rng_per_process": rngs})


def restore(state: dict, model, optimizer, scheduler, processes) -> int:
    """`checkpoint.restore` for a sharded run; takes a checkpoint from any process count.

    Each process gets its own saved RNG state when the count matches; otherwise all take rank 0's
    (the weights and optimizer resume exactly, the dropout draws then differ from either run).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    order = _optimizer_order(model, optimizer)
    unknown = sorted(set(state["adapter"]) - set(order))
    if unknown:
        raise RecoverLoraError(f"checkpoint holds {unknown[0]}, which the model does not have; start over with --force")
    options = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: the frozen weights are not saved
    # set_*_state_dict replace the values of the dicts they are given with shards: hand them copies.
    set_model_state_dict(model, dict(state["adapter"]), options=options)
    saved = state["optimizer"]
    by_name = {
        "state": {order[i]: dict(value) for i, value in saved["state"].items()},
        "param_groups": [group | {"params": [order[i] for i in group["params"]]} for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rng_per_process") or []
    ckpt.set_rng_state(rngs[processes.process_index] if len(rngs) == processes.num_processes else state["rng"])
    return int(state["step"])


def unsharded_block_scales(model, replaced: dict, parameters: dict) -> dict:
    """Plain copies of the sharded Q2KWeight modules holding the gathered values, for `save_block_scales`."""
    from recover_lora.recovery.block_scales import q2k_with_parameters

    names = {id(module): name for name, module in model.named_modules()}
    copies = {}
    for tensor_name, q2k in replaced.items():
        values = {name: parameters[f"{names[id(q2k)]}.{name}"] for name, _ in q2k.named_parameters()}
        copies[tensor_name] = q2k_with_parameters(q2k, values)
    return copies
