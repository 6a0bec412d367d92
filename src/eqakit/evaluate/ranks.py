"""Predict under ``torchrun``: which share of the questions a process answers, and where it writes.

Each process (``RANK`` of ``WORLD_SIZE``, from torchrun's environment) takes whole episodes of the
questions still to answer, balanced by count (questions about the same frames stay together, so a
process runs each frame through the vision tower once and prefills each episode once), on its own
device (`eqakit.model.load.pick_device` reads ``LOCAL_RANK``). It appends its answers to a part
file of its own beside ``generated_predictions.jsonl``; after every process is done (a gloo barrier:
it works beside CUDA too), process 0 merges the parts into the one file in dataset order and
scores it. An interrupted run leaves its parts, which the next run, at any world size, reads as done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from eqakit.train.packing import deal


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def share(self, todo: list[int], episode: Callable[[int], Hashable]) -> list[int]:
        """This process's indices of ``todo``, in ``todo``'s order: whole episodes, balanced by count
        (`eqakit.train.packing.deal`, as training splits a step)."""
        mine = set(deal(todo, episode, self.world)[self.rank])
        return [i for i in todo if i in mine]

    def part(self, path: Path) -> Path:
        """Where this process appends its answers: ``path`` alone, else a part file of its own."""
        return path if self.world == 1 else path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")

    def wait_for_all(self) -> None:
        """Return when every process got here (a process that dies makes torchrun stop the rest).
        The process group is made once per run (`close` ends it): made again on torchrun's store,
        a group could read the previous one's addresses."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(days=1))  # predict runs as long as it runs
        dist.barrier()

    def close(self) -> None:
        """End the process group `wait_for_all` made, if any."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def parts(path: Path) -> list[Path]:
    """The part files processes of earlier or current runs wrote beside ``path``."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
