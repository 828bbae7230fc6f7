"""Data-parallel training under the standard launcher::

    torchrun --nproc_per_node K -m archkit train SPEC      # one machine, K processes
    torchrun --nnodes M --nproc_per_node K --rdzv-endpoint HOST:PORT -m archkit train SPEC

How K ranks share one run, so that its numbers do not depend on K:

1. Every rank draws the whole global batch (``train.batch_size`` examples, a pure function
   of seed and step) and keeps its rows: rank r of K the r-th of K equal slices. The
   global batch is the same for any K; ``train.batch_size`` must divide by K.
2. A rank's loss is the cross-entropy summed over its rows' answer tokens, divided by the
   answer tokens of the whole batch and multiplied by K. DistributedDataParallel averages
   gradients over ranks, so every rank steps with the gradient of the global batch's mean
   loss, as one process would (up to float32 reduction order).
3. Evaluation splits the held-out set by chunks of ``train.batch_size`` (chunk i on rank i
   mod K) and combines predictions and per-chunk losses on every rank: the same chunks as
   one process computes, so the same score.
4. Rank 0 alone writes: logs, TensorBoard, checkpoints, ``final.json``. A checkpoint holds
   no trace of K, so a run resumes under any layout.
5. A stop (Ctrl-C on any rank; a target or a plateau, as rank 0 judges it from its own
   ``metrics.jsonl``) is agreed by all ranks before the next step, so no rank waits
   forever in a collective.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (each rank on ``cuda:<LOCAL_RANK>``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from archkit.spec import SpecError
from archkit.tasks import TaskBatch


@dataclass(frozen=True)
class Layout:
    """Where this process sits among the ranks of one run (rank 0 of 1: no launcher)."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP: parameters, gradients and optimiser states sharded

    @property
    def writer(self) -> bool:
        """Whether this rank writes the run's files (rank 0)."""
        return self.rank == 0

    def rows(self, batch: TaskBatch) -> TaskBatch:
        """This rank's slice of a global batch (step 1 of the module docstring)."""
        if self.world == 1:
            return batch
        size = len(batch) // self.world
        rows = slice(self.rank * size, (self.rank + 1) * size)
        return TaskBatch(batch.tokens[rows], batch.loss_mask[rows], batch.context_len,
                         batch.difficulty[rows], batch.examples[rows],
                         batch.answer_difficulty[rows])

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a global batch that does not split into equal slices."""
        if batch_size % self.world:
            raise SpecError("train.batch_size", f"a multiple of the {self.world} ranks, so "
                            "each draws an equal slice of the global batch", batch_size)

    def loss_weight(self, mine: TaskBatch, whole: TaskBatch) -> float:
        """What turns the mean loss over this rank's answer tokens into its share of the
        global mean, times K (step 2 of the module docstring)."""
        if self.world == 1:
            return 1.0
        return self.world * float(mine.loss_mask.sum()) / float(whole.loss_mask.sum())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (in place; returned)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``tensor`` over the ranks (in place; returned)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        if self.world == 1:
            return tensor
        if dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
            on_device = tensor.cuda()
            dist.all_reduce(on_device, op=op)
            return tensor.copy_(on_device.cpu())
        dist.all_reduce(tensor, op=op)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank: every rank gets the same answer."""
        return bool(self.max(torch.tensor([int(flag)]))[0]) if self.world > 1 else flag

    def mine(self, chunk: int) -> bool:
        """Whether evaluation chunk ``chunk`` is this rank's (step 3)."""
        return chunk % self.world == self.rank

    def wait_for_all(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """What a training step calls: ``module`` under DistributedDataParallel when there
        are several ranks, ``module`` itself alone or sharded (FSDP reduces gradients in
        its own hooks)."""
        if self.world == 1 or self.sharded:
            return module
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, sleeper: nn.Module, layers: Iterable[nn.Module]) -> None:
        """FSDP2: each of ``layers`` a unit of its own, the rest (embedding, head, norm)
        the root unit; in place, before the optimisers are made."""
        if not self.sharded:
            return
        for layer in layers:
            fully_shard(layer)
        fully_shard(sleeper)

    @property
    def for_evaluation(self) -> Layout:
        """Sharded, a forward is a collective, so every rank runs every chunk; replicated,
        the chunks are split (step 3)."""
        return SINGLE if self.sharded else self

    def scalar(self, value: torch.Tensor) -> float:
        """A reduced scalar as a float (a DTensor, sharded, is made whole first)."""
        return float(value.full_tensor() if isinstance(value, DTensor) else value)

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights, on CPU, on rank 0 (empty on other ranks, sharded)."""
        if not self.sharded:
            return module.state_dict()
        whole = get_model_state_dict(module, options=WHOLE_ON_CPU)
        first_name: dict[int, str] = {}  # gathered, tied weights come back as two copies
        for name, param in module.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(param), name)
            if first != name and name in whole:
                whole[name] = whole[first]
        return whole

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[str, Any]:
        """The optimiser's whole state in ``optimizer.state_dict()``'s layout (parameters
        by position), whatever the sharding, so a checkpoint resumes under any layout."""
        if not self.sharded:
            return optimizer.state_dict()
        by_name = get_optimizer_state_dict(module, optimizer, options=WHOLE_ON_CPU)
        if not by_name:  # ranks other than 0
            return {}
        names = [name for group in by_name["param_groups"] for name in group["params"]]
        position = {name: index for index, name in enumerate(names)}
        return {"state": {position[name]: state for name, state in by_name["state"].items()},
                "param_groups": [{**group, "params": [position[n] for n in group["params"]]}
                                 for group in by_name["param_groups"]]}

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                             saved: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state`'s layout into ``optimizer``, sharded or not."""
        if not self.sharded:
            optimizer.load_state_dict(saved)
            return
        name_of = {id(param): name for name, param in module.named_parameters()}
        names = [name_of[id(param)] for group in optimizer.param_groups
                 for param in group["params"]]
        by_name = {"state": {names[index]: state for index, state in saved["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in saved["param_groups"]]}
        set_optimizer_state_dict(module, optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True))


SINGLE = Layout()
WHOLE_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: torch.device, parallel: str = "ddp") -> Iterator[Layout]:
    """Join the launcher's process group for the block (``gloo`` on CPU, ``nccl`` on
    CUDA, where each rank takes ``cuda:<LOCAL_RANK>``); without a launcher, one rank.
    ``parallel``: ``ddp`` replicates the model on every rank, ``fsdp`` shards it."""
    if not launched():
        yield SINGLE
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield Layout(dist.get_rank(), dist.get_world_size(), sharded=parallel == "fsdp")
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:<LOCAL_RANK>`` under a launcher, else ``device``."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
