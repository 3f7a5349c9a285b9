"""One sampling job over several processes: rank and world size, the process group, sharing.

The launchers do the spawning; this module only reads what they set:

* `torchrun --nproc_per_node N` and `accelerate launch --num_processes N` set RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
* a SLURM job started by Hydra's submitit launcher with `tasks_per_node > 1` has one task
  per GPU and SLURM's variables; submitit's `TorchDistributedEnvironment` turns them into
  the same variables.

A single process (no such variables) gets `Dist()` (rank 0 of 1) and every collective is a
no-op, so single-process code paths run unchanged. CPU ranks use the gloo backend, CUDA
ranks nccl (each on `cuda:LOCAL_RANK`).
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from diffusion.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is a process group to talk to."""
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def broadcast(self, obj):
        """Rank 0's obj, on every rank (any picklable object)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """fn() on rank 0, its result on every rank; an exception of rank 0 is raised on every rank
        (so that all processes stop together instead of waiting for rank 0 in the next collective)."""
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - sent to the other ranks, then raised
                failure = err
        result, failure = self.broadcast((result, failure)) if self.active else (result, failure)
        if failure is not None:
            raise failure
        return result

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device becomes this rank's own GPU (cuda:LOCAL_RANK); CPU stays CPU."""
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device


def _submitit_env_exported() -> bool:
    """Inside a submitit job with several tasks: export torch's variables from SLURM's."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    if JobEnvironment().num_tasks <= 1:
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r}: must be an integer") from None


def dist_from_env() -> Dist:
    """Rank, world size and local rank as the launcher set them (a single process: 0, 1, 0)."""
    if "WORLD_SIZE" not in os.environ:
        _submitit_env_exported()
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return Dist(rank, world, local)


@contextmanager
def process_group(device_name: str = "auto"):
    """Join the launcher's process group for the block (gloo on CPU, nccl on CUDA); yields a Dist.

    A single process yields Dist() and creates no group. A group that already exists (an
    outer caller made it) is used and left alone.
    """
    dist = dist_from_env()
    created = False
    if dist.world_size > 1 and not torch_dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(dist.local_rank)
        torch_dist.init_process_group(backend=backend)
        created = True
        log.info("rank %d of %d (local %d), backend %s", dist.rank, dist.world_size, dist.local_rank, backend)
    try:
        yield dist
    finally:
        if created:
            torch_dist.destroy_process_group()


# what Hydra writes into a run folder before the job function runs
_HYDRA_FILES = (".hydra",)


def shared_output_dir(dist: Dist, own_dir: str | Path) -> Path:
    """Rank 0's output folder, on every rank.

    Each rank's Hydra resolves `${now:...}` itself, so ranks started a second apart get
    different run folders. Rank 0's wins; another rank's own folder, if different, held only
    what Hydra wrote before the job started (.hydra/ and the log) and is removed (anything
    else in it is left alone).
    """
    own_dir = Path(own_dir)
    shared = Path(dist.broadcast(str(own_dir.resolve())))
    if own_dir.resolve() != shared and own_dir.is_dir():
        entries = list(own_dir.iterdir())
        if all(p.name in _HYDRA_FILES or p.suffix == ".log" for p in entries):
            for p in entries:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            try:
                own_dir.rmdir()
            except OSError:
                pass
    return shared


def batches_for_rank(batches: list[list[int]], dist: Dist) -> list[list[int]]:
    """Batches dealt round-robin over ranks: every batch keeps the composition it has in a
    single-process run (so images are equal to the bit, not only up to batch-size rounding)."""
    return batches[dist.rank::dist.world_size]
