"""Distributed helpers: CPU (gloo) DeepSpeed/torchrun set-up before TrainingArguments, and ZeRO-3 gather utilities.

Imports nothing from llava_train. torch, accelerate and deepspeed are imported inside functions so that
importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Variables a launcher (deepspeed, torchrun, accelerate launch, our own single-process set-up) exports.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def has_accelerator() -> bool:
    """True when torch sees CUDA (or another torch accelerator); False on CPU-only machines."""
    import torch

    if torch.cuda.is_available():
        return True
    accel = getattr(torch, "accelerator", None)
    return bool(accel is not None and accel.is_available())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uses_deepspeed(train_kwargs: Mapping[str, Any]) -> bool:
    """Whether the run trains under DeepSpeed: a `train.deepspeed` JSON, or an `accelerate launch --use_deepspeed`."""
    # `accelerate launch --use_deepspeed` exports this even when the run config names no JSON.
    return bool(train_kwargs.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def prepare_distributed(train_kwargs: Mapping[str, Any], fsdp: bool = False) -> dict[str, Any]:
    """Set up CPU-only distributed runs; call before building TrainingArguments, pass it the returned kwargs.

    `fsdp`: the run trains under FSDP2 (`train.fsdp`): on any machine accelerate's PartialState is created here
    (gloo on CPU) and `accelerator_config.use_configured_state=True` returned, so `training.fsdp.activate_fsdp`
    can make it an FSDP2 state after TrainingArguments exist (accelerate alone never enables FSDP on CPU).

    On a machine with CUDA (or another accelerator) this returns a copy of `train_kwargs` unchanged:
    the launchers and accelerate handle everything. Without one:

    - `DS_ACCELERATOR=cpu` is set (unless already set), so DeepSpeed picks its CPU accelerator and gloo.
    - With a DeepSpeed config and no launcher environment (plain `python -m llava_train.train`), the
      single-process RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are exported; otherwise
      DeepSpeed falls back to MPI discovery and fails wanting mpi4py.
    - With DeepSpeed, accelerate's `PartialState(backend="gloo")` is created here with
      `ACCELERATE_USE_DEEPSPEED=true`, and `accelerator_config.use_configured_state=True` is returned.
      Without it accelerate (1.15) finds no accelerator, leaves the backend unset and counts ONE
      process: HF fills the "auto" batch sizes for world size 1 (DeepSpeed then asserts on
      train_batch_size) or, with no train_batch_size in the JSON, every rank trains on the same batches.
    - `use_cpu=True` is returned: bf16 on CPU needs it, and for launches without DeepSpeed (torchrun)
      it is what makes accelerate use its multi-CPU gloo path instead of counting one process.
    """
    kwargs = dict(train_kwargs)
    if fsdp:
        return _prepare_fsdp(kwargs)
    if has_accelerator():
        return kwargs
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    kwargs["use_cpu"] = True
    if not uses_deepspeed(kwargs):
        return kwargs
    _single_process_env()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    return _use_configured_state(kwargs)


def _prepare_fsdp(kwargs: dict[str, Any]) -> dict[str, Any]:
    """FSDP2: the launcher's environment (or a one-process one), then accelerate's PartialState (gloo on CPU)."""
    from accelerate import PartialState

    _single_process_env()
    if has_accelerator():
        PartialState()
    else:
        kwargs["use_cpu"] = True
        PartialState(cpu=True, backend="gloo")
    return _use_configured_state(kwargs)


def _single_process_env() -> None:
    """Without a launcher, the RANK/WORLD_SIZE/... of a one-process group (else DeepSpeed falls back to MPI)."""
    if "LOCAL_RANK" not in os.environ:
        single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for name, value in single.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _use_configured_state(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`accelerator_config.use_configured_state=True` added: the Trainer's Accelerator takes the state made here."""
    accelerator_config = kwargs.get("accelerator_config")
    if accelerator_config is None:
        accelerator_config = {}
    elif not isinstance(accelerator_config, Mapping):
        raise ValueError(
            "train.accelerator_config must be a mapping when DeepSpeed runs on CPU or under FSDP2 (llava-train adds "
            f"use_configured_state=True to it), got {type(accelerator_config).__name__}"
        )
    kwargs["accelerator_config"] = {**dict(accelerator_config), "use_configured_state": True}
    return kwargs


# ---------------------------------------------------------------------------------------------
# ZeRO-3 helpers.


def zero3_enabled() -> bool:
    """True when the live TrainingArguments carry a ZeRO-3 DeepSpeed config (transformers' own check)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def is_zero3_param(param: Any) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (it carries `ds_id` / `ds_tensor`)."""
    return hasattr(param, "ds_id")


def local_numel(param: Any) -> int:
    """Elements of `param` this rank holds: its ZeRO-3 partition (`ds_tensor`) or FSDP2 shard, else all of it."""
    if is_zero3_param(param):
        return int(param.ds_tensor.numel())
    if hasattr(param, "to_local"):  # an FSDP2 DTensor: numel() counts the whole parameter
        return int(param.to_local().numel())
    return int(param.numel())


def full_numel(param: Any) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it (`ds_numel`)."""
    if is_zero3_param(param):
        return int(param.ds_numel)
    return int(param.numel())


@contextlib.contextmanager
def gathered(params: Any, modifier_rank: int | None = 0) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned `params` hold their full values; a no-op for ordinary tensors.

    `params` is a module (all its parameters) or an iterable of parameters. With `modifier_rank=0`
    the values rank 0 writes inside the block are broadcast and re-partitioned on exit, so loading
    a projector or any partial weights works with `copy_` / `load_state_dict` under `torch.no_grad()`
    (instead of `size mismatch ... torch.Size([0])`). `modifier_rank=None` gathers read-only (saving).
    Every rank must enter the block: the gather is a collective.
    """
    import torch

    plist = list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)
    partitioned = [p for p in plist if is_zero3_param(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_tensor(tensor: Any) -> Any:
    """The whole of a tensor FSDP2 sharded (a DTensor: all-gathered, so every rank must call it in the same order),
    else the tensor itself. Keeps the held dtype (fp32 masters stay fp32; FSDP's own unshard would give the
    compute dtype)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def load_state_dict_gathered(module: Any, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """`module.load_state_dict(state_dict, strict)` that also works when ZeRO-3 has partitioned `module`.

    Gathers the module's parameters (modifier rank 0), loads, and re-partitions on exit; returns
    load_state_dict's (missing_keys, unexpected_keys). Call it on every rank.
    """
    import torch

    with gathered(module, modifier_rank=0), torch.no_grad():
        return module.load_state_dict(dict(state_dict), strict=strict)


def shutdown_distributed(success: bool) -> bool:
    """End this process's part of a distributed run; returns True when a process group was destroyed.

    Call it once, at the very end of a launched process (`python -m llava_train.train`, `llava-train
    train`), on every rank. After a successful run the ranks first meet at a barrier, so no rank tears
    down its communicator while a peer is still in a collective (the final save gathers ZeRO-3 shards),
    then every process group (the default one and those DeepSpeed created) is destroyed. Left to the
    interpreter's exit, gloo's and NCCL's communicator threads were torn down in whatever order
    finalisation happened to run, and a finished 2-rank run aborted in about 1 of 5 launches with
    `terminate called without an active exception` (exit code 250 from the deepspeed launcher).
    After a failure there is no barrier (the peers may be anywhere): the local groups are destroyed,
    which closes this rank's connections so its peers fail fast instead of waiting for a timeout.
    Also removes the shared-memory workspace DeepSpeed's CPU communication backend leaves behind.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    this_rank = dist.get_rank()
    try:
        if success:
            dist.barrier()
    finally:
        try:
            dist.destroy_process_group()
        finally:
            # Also when tearing down a broken group raises (a peer died): the segment is RAM.
            release_deepspeed_shm(this_rank)
    return True


def exit_after_teardown(code: int) -> None:
    """End a launched rank whose process groups were destroyed with exit code `code`, skipping C++ finalization.

    Even with every group destroyed, a finished rank still aborted at interpreter exit in ~1 of 10 ZeRO-3
    launches (`terminate called without an active exception`, launcher exit 250, seen after a resume from
    a DeepSpeed checkpoint): a C++ thread owned by a static object (DeepSpeed's or torch's communication
    state) is destroyed while joinable during finalization. Everything a run writes is on disk and
    fsync'd by then, so the process does the Python part of a normal exit (joins non-daemon threads,
    runs atexit handlers: wandb's finish, logging), flushes stdio, and leaves with `os._exit(code)`.
    """
    import atexit
    import contextlib
    import logging
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(timeout=60)
    try:
        atexit._run_exitfuncs()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def release_deepspeed_shm(global_rank: int) -> bool:
    """Unlink this rank's `/dev/shm/deepspeed_allreduce_buffer_*` segment; True when there was one.

    Under the `deepspeed` launcher on CPU (LOCAL_SIZE == WORLD_SIZE), DeepSpeed 0.19's TorchBackend
    creates a 69 MB POSIX shared-memory workspace per rank, named after the uid, MASTER_ADDR,
    MASTER_PORT and the rank, and never unlinks it: /dev/shm is RAM, so a machine that runs a few
    hundred launches (CI, sweeps) runs out of memory. Call after the last collective.
    """
    if "deepspeed" not in sys.modules or not hasattr(os, "getuid"):
        return False
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    segment = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{global_rank}"
    if not segment.exists():
        return False
    segment.unlink(missing_ok=True)
    return True


def collective_device() -> Any:
    """Where a tensor must live for a collective on the default group: CUDA for NCCL, CPU for gloo."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _process_group() -> Any:
    """torch.distributed when torch is already imported and a process group is up, else None (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    dist = _process_group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def world_size() -> int:
    """Number of processes: the process group's when one is up, else the launcher's WORLD_SIZE, else 1."""
    dist = _process_group()
    return int(dist.get_world_size()) if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank: the process group's when one is up, else the launcher's RANK (or SLURM_PROCID), else 0.

    The one rank of the package (logging asks it too); cheap enough for any code path: it never imports torch.
    """
    dist = _process_group()
    if dist is not None:
        return int(dist.get_rank())
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
