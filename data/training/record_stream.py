"""A shuffled, rank-sharded, resumable stream over a list of records whose media may fail to decode.

The order-and-resume mechanism of `herd.data.training.image_text.ImageTextDataset`, with the decoding
left to a subclass (`load(index)` → a sample, or None after counting why it failed), so that a new
modality's dataset (audio: `herd.data.training.audio`) does not copy it. (`ImageTextDataset` still has its
own copy of the mechanism; moving it onto this base is a follow-up, left out while the video work edits it.)

Epoch e is a permutation of all records seeded by (seed, e); round j of it gives data-parallel rank r the
record at j·world_size + r. Every rank yields exactly one sample per round: when its record cannot be
used it takes the next usable record of its own share instead (and remembers the bad one, decoding
being deterministic). Ranks therefore stay in lockstep, and the state (epoch, round) is the same on
every rank, which is what the checkpointer stores once for all ranks. A resumed run yields exactly the
samples the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.utils.data

from herd.data.records import NoUsableRecords, SkipCounter


class RecordStream(torch.utils.data.IterableDataset):
    """Base class: `n_records` records, subclass's `load(index, epoch)` decodes one (None: skipped).

    `loop=True` runs forever (training); `loop=False` ends after the current epoch (the next `iter` starts
    the following one). `len()` is the number of samples a rank gets per epoch. Under a DataLoader with
    workers, worker w takes rounds w, w+n, … so the loader's round-robin yields the same order; the
    loader's copies hold the state then, so resume by calling `load_state_dict` before building it.
    """

    what = "record"  # in messages: "no readable <what> among ..."

    def __init__(
        self,
        n_records: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        skipped: SkipCounter | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.skipped = skipped if skipped is not None else SkipCounter()
        if n_records < world_size:
            raise NoUsableRecords(
                f"{n_records} records cannot feed {world_size} data-parallel rank(s): nothing usable is "
                f"left ({self.skipped.summary()})"
            )
        self.n_records, self.rank, self.world_size = n_records, rank, world_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.rounds = n_records // world_size  # the tail of each permutation waits for the next epoch
        self.epoch, self.position = 0, 0
        self._bad: set[int] = set()  # records known to be unusable
        self._order_epoch, self._order = -1, np.arange(0)

    def load(self, index: int, epoch: int) -> dict[str, Any] | None:
        """Record `index` decoded, or None after `self.skipped.add(reason, ...)`."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.rounds

    def _mine(self, epoch: int) -> np.ndarray:
        """Record indices of this rank for `epoch`, one per round."""
        if self._order_epoch != epoch:
            n = self.n_records
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = order[self.rank : self.rounds * self.world_size : self.world_size]
            self._order_epoch = epoch
        return self._order

    def _sample_for_round(self, epoch: int, round_: int) -> dict[str, Any]:
        mine = self._mine(epoch)
        for k in range(self.rounds):  # the round's record, else the next usable one of this rank
            index = int(mine[(round_ + k) % self.rounds])
            if index in self._bad:
                continue
            sample = self.load(index, epoch)
            if sample is not None:
                return sample
            self._bad.add(index)
        raise NoUsableRecords(
            f"no readable {self.what} among the {self.rounds} records of data rank {self.rank}: nothing usable "
            f"is left ({self.skipped.summary()})"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        start = t = self.epoch * self.rounds + self.position  # rounds are counted across epochs
        end = (self.epoch + 1) * self.rounds  # loop=False: the rest of the current epoch
        while self.loop or t < end:
            epoch, round_ = divmod(t, self.rounds)
            t += 1
            if (t - 1 - start) % n_workers != worker:
                continue
            sample = self._sample_for_round(epoch, round_)
            self.epoch, self.position = divmod(t, self.rounds)  # set before yielding: resume *after* it
            yield sample
        self.epoch, self.position = divmod(end, self.rounds)

    def state_dict(self) -> dict[str, Any]:
        # The same on every rank (no per-rank counters): the checkpointer stores one copy for all.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "seed": self.seed,
            "n_records": self.n_records,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["n_records"], state["seed"]) != (self.n_records, self.seed):
            raise ValueError(
                f"data state is for {state['n_records']} records with seed {state['seed']}, this dataset has "
                f"{self.n_records} with seed {self.seed}: resuming would change the samples"
            )
        self.epoch, position = int(state["epoch"]), int(state["position"])
        # Another data-parallel size: continue after the same number of records of the global order
        # (rounded down, so at most one round's records are seen twice).
        self.position = position * int(state["world_size"]) // self.world_size


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for what is drawn per sample (crops, masks): the same for record `index` of `epoch`
    whatever the data-parallel layout, different across epochs."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


__all__ = ["RecordStream", "sample_seed"]
