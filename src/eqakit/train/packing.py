"""Shared-prefix packing: the questions of one episode trained as branches of one sequence.

An OpenEQA sample is ``<|im_start|>user\\n`` + ~1,500 image tokens + question + answer, and an
episode's ~11 questions share everything up to the question. Packed, a row holds that prefix once
and each question/answer as a branch that attends to the prefix and to itself only (a 4D mask),
with M-RoPE positions taken from the branch's own separate sequence. Each branch token then sees
exactly what it would see alone, so the logits, and the loss over the batch's answer tokens, equal
the separate samples' (tests check within 1e-5 in fp32) at a fraction of the tokens.

Packing spans the optimizer step, not the micro-batch. `EpisodeBatchSampler` draws a step's
``per_device_train_batch_size x gradient_accumulation_steps x world_size`` samples episode by
episode and gives each process whole episodes of it (the same steps at any world size); the
trainer (`eqakit.train.trainer.EqakitTrainer.get_batch_samples`) packs all of them (`pack_rows`: one
row per episode, split where a row would outgrow the budget) and regroups the rows into micro-batches
(`micro_batches`) no larger, padded, than the largest micro-batch the step had unpacked, so the peak
memory is not higher. At the seed's 2 x 8 an episode's questions are one row instead of 8 micro-batches
that each repeat its frames. The step's loss stays the sum over its answer tokens divided by their
count, as transformers computes it unpacked (``num_items_in_batch``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eqakit.data.encode import IGNORE_INDEX, VIDEO_TIMES
from eqakit.train.data import MEDIA, PER_ITEM


def deal(items: list[int], group: Callable[[int], Hashable], shares: int) -> list[list[int]]:
    """``items`` dealt into ``shares`` lists, each group whole (the largest first, each to the
    share with the fewest items so far), each list in the order of ``items``: how processes split
    a training step's episodes and predict's questions, the same answer on every process."""
    groups: dict[Hashable, list[int]] = {}
    for i in items:
        groups.setdefault(group(i), []).append(i)
    dealt: list[list[int]] = [[] for _ in range(shares)]
    for members in sorted(groups.values(), key=len, reverse=True):
        min(dealt, key=len).extend(members)
    return dealt


@dataclass(frozen=True)
class StandIn:
    """A sample index fed to a process that has no sample of its own in an optimizer step: its
    loss is multiplied by zero (`eqakit.train.trainer.EqakitTrainer`), but its forward and backward
    take part in every collective DDP runs, so no process waits for another forever."""

    index: int


class EpisodeBatchSampler(torch.utils.data.Sampler[list[Any]]):
    """One process's micro-batches: ``accumulation`` per optimizer step, the step's samples taken
    episode by episode, the steps reshuffled every epoch.

    A step holds ``batch_size x accumulation x world_size`` samples (the global batch), chosen by the
    seed and epoch alone, so a run trains the same steps at any world size with the same global
    batch. Each process takes whole episodes of the step (the largest first, each to the process
    with the fewest samples so far) and splits its share over its micro-batches (some may be empty:
    the trainer repacks the step as a whole); a process left without any gets one `StandIn`.
    """

    def __init__(
        self,
        groups: list[list[int]],
        batch_size: int,
        seed: int,
        accumulation: int = 1,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.groups, self.batch_size, self.seed, self.epoch = groups, batch_size, seed, 0
        self.accumulation, self.world_size, self.rank = accumulation, world_size, rank
        self.group_of = {i: g for g, members in enumerate(groups) for i in members}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[int]]:
        """This epoch's optimizer steps, each the global batch's sample indices (every process's)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups = [rng.sample(g, len(g)) for g in self.groups]
        rng.shuffle(groups)
        flat = [i for g in groups for i in g]
        per_step = self.batch_size * self.accumulation * self.world_size
        steps = [flat[i : i + per_step] for i in range(0, len(flat), per_step)]
        rng.shuffle(steps)
        return steps

    def share(self, step: list[int]) -> list[int]:
        """This process's samples of a step: whole episodes, balanced by count over the processes."""
        return deal(step, self.group_of.__getitem__, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[list[Any]]:
        for step in self.steps():
            mine: list[Any] = self.share(step) or [StandIn(step[0])]
            size, extra = divmod(len(mine), self.accumulation)
            cuts = [k * size + min(k, extra) for k in range(self.accumulation + 1)]
            # the fuller micro-batches last: an empty one is a slot packing skips anyway
            yield from reversed([mine[cuts[k] : cuts[k + 1]] for k in range(self.accumulation)])

    def __len__(self) -> int:
        samples = sum(len(g) for g in self.groups)
        return -(-samples // (self.batch_size * self.accumulation * self.world_size)) * self.accumulation


def _shared_prefix(features: list[dict[str, torch.Tensor]]) -> int:
    """Longest prefix common to all, holding every image token, learning nothing, leaving each a token.

    Read with numpy: the samples are host tensors (``Tensor.numpy`` refuses a device one), so packing
    never waits for an accelerator."""
    ids = [f["input_ids"].numpy() for f in features]
    limit = min(len(x) for x in ids) - 1
    if limit <= 0:
        return 0
    same = np.ones(limit, dtype=bool)
    for other in ids[1:]:
        same &= other[:limit] == ids[0][:limit]
    for f in features:
        same &= f["labels"].numpy()[:limit] == IGNORE_INDEX
    n = int(np.argmin(same)) if not same.all() else limit
    last_image = max(_visual_end(f["mm_token_type_ids"].numpy()) for f in features)
    return n if n >= last_image else 0


def _visual_end(types: np.ndarray) -> int:
    """One past the last image or video token (0 if there is none)."""
    visual = np.flatnonzero(types)
    return int(visual[-1]) + 1 if len(visual) else 0


def _packed_length(members: list[dict[str, Any]]) -> int:
    prefix = _shared_prefix(members) if len(members) > 1 else 0
    return (
        prefix + sum(len(m["input_ids"]) - prefix for m in members)
        if prefix
        else sum(len(m["input_ids"]) for m in members)
    )


def pack_rows(features: list[dict[str, Any]], budget: int | None = None) -> list[dict[str, Any]]:
    """Rows for ``features``: each run of samples with the same images packed into one row (split
    where a row would be longer than ``budget`` tokens), samples sharing no prefix alone."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in features:
        groups.setdefault(f["media_key"], []).append(f)
    rows = []
    for members in groups.values():
        parts: list[list[dict[str, Any]]] = [[]]
        for m in members:
            if parts[-1] and budget is not None and _packed_length([*parts[-1], m]) > budget:
                parts.append([])
            parts[-1].append(m)
        for part in parts:
            prefix = _shared_prefix(part) if len(part) > 1 else 0
            rows += [_row([m], 0) for m in part] if prefix == 0 else [_row(part, prefix)]
    return rows


def pack_pair(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    """A preference pair as one row: the shared prompt (and its media) once, then the chosen answer
    (branch 0) and the rejected one (branch 1)."""
    prefix = _shared_prefix([chosen, rejected])
    if prefix == 0:  # planning gives both sides one prompt and one media plan
        raise ValueError("a preference pair's two sides share no prompt")
    return _row([chosen, rejected], prefix)


def micro_batches(rows: list[dict[str, Any]], budget: int) -> list[list[dict[str, Any]]]:
    """Rows in order, grouped so that no group's padded size (rows x longest) exceeds ``budget``."""
    batches: list[list[dict[str, Any]]] = []
    longest = 0
    for row in rows:
        n = len(row["input_ids"])
        if batches and (len(batches[-1]) + 1) * max(longest, n) <= budget:
            batches[-1].append(row)
            longest = max(longest, n)
        else:
            batches.append([row])
            longest = n
    return batches


def padded_size(features: list[dict[str, Any]]) -> int:
    """Tokens a micro-batch of these samples occupies unpacked and right-padded."""
    return len(features) * max(len(f["input_ids"]) for f in features)


@dataclass
class PackedCollator:
    """Packs each run of samples with the same images into one row; rows are right-padded.

    Everything the forward and the loss need besides the model's own M-RoPE positions is built here,
    on the host, from the rows' layout (`branch_mask`, `target_columns`): moved to the device with the
    batch, it is never read back from there (positions come from `packed_positions`, also on the host
    where the trainer can call it: `eqakit.train.trainer.EqakitTrainer.get_batch_samples`)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collate_rows(pack_rows(features))

    def collate_rows(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """One batch of already packed rows (`pack_rows`)."""
        longest = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, Any] = {
            "input_ids": torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long),
            "mm_token_type_ids": torch.zeros(len(rows), longest, dtype=torch.int),
            "attention_mask": torch.zeros(len(rows), longest, dtype=torch.long),
            "packed_prefix": torch.tensor([r["prefix"] for r in rows]),
            "packed_branches": [torch.tensor(r["branches"]) for r in rows],
            "packed_allowed": torch.stack([branch_mask(r, longest) for r in rows]),
            **target_columns(rows),
            "image_counts": torch.tensor([r["images"] for r in rows]),
            "video_counts": torch.tensor([r["videos"] for r in rows]),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][i, :n] = r["input_ids"]
            batch["mm_token_type_ids"][i, :n] = r["mm_token_type_ids"]
            batch["attention_mask"][i, :n] = 1
        for key in PER_ITEM:
            if any(key in r for r in rows):
                batch[key] = torch.cat([r[key] for r in rows if key in r])
        for grid, pixels, keys in MEDIA:
            if any(grid in r for r in rows):
                batch[grid] = torch.cat([r[grid] for r in rows if grid in r])
            if any(keys in r for r in rows):
                batch[keys] = [k for r in rows for k in r.get(keys, [])]
            elif any(pixels in r for r in rows):
                batch[pixels] = torch.cat([r[pixels] for r in rows if pixels in r])
        return batch


def branch_mask(row: dict[str, Any], width: int) -> torch.Tensor:
    """Which positions each position of a packed row attends to, ``(width, width)``: the prefix
    causally, each branch the prefix and itself causally, padding itself alone (so no row of the
    additive mask is all minus infinity, which would give NaN). Built from the row's layout on the
    host: made on the device from the batch's tensors it would read them back."""
    prefix, length = row["prefix"], len(row["input_ids"])
    allowed = torch.zeros(width, width, dtype=torch.bool)
    allowed[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
    for start, size in row["branches"]:
        allowed[start : start + size, :prefix] = True
        allowed[start : start + size, start : start + size] = torch.ones(size, size, dtype=torch.bool).tril()
    padding = torch.arange(length, width)
    allowed[padding, padding] = True
    return allowed


def target_columns(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The loss's bookkeeping, from the rows' targets on the host: ``packed_sources``, the sorted
    positions whose logits are computed (the same for every row: a position that predicts nothing
    in a row costs one vocabulary row of logits); ``packed_picks``, (row, column of
    ``packed_sources``, branch) of every learned token, row by row in target order;
    ``packed_labels``, the tokens they predict."""
    sources = sorted({target[0] for r in rows for target in r["targets"]})
    column = {s: i for i, s in enumerate(sources)}
    picks = [(i, column[source], branch) for i, r in enumerate(rows) for source, _, branch in r["targets"]]
    return {
        "packed_sources": torch.tensor(sources, dtype=torch.long),
        "packed_picks": torch.tensor(picks, dtype=torch.long).reshape(-1, 3),
        "packed_labels": torch.tensor(
            [label for r in rows for _, label, _ in r["targets"]], dtype=torch.long
        ),
    }


def _row(members: list[dict[str, Any]], prefix: int) -> dict[str, Any]:
    """One packed row: the prefix, then each member's remainder as a branch.

    ``targets`` lists (position of the predicting logit, target token id, branch) for every learned
    token: a branch's first token is predicted from the prefix's last position, the rest from their
    left neighbour, exactly as in the member's own sequence; ``branch`` is the member's index (a
    preference pair's chosen answer is branch 0, its rejected one branch 1).
    """
    first = members[0]
    ids, types = [first["input_ids"][:prefix]], [first["mm_token_type_ids"][:prefix]]
    branches, targets, start = [], [], prefix
    for branch, m in enumerate(members):
        tail_ids, tail_labels = m["input_ids"][prefix:], m["labels"][prefix:]
        ids.append(tail_ids)
        types.append(m["mm_token_type_ids"][prefix:])
        branches.append((start, len(tail_ids)))
        for k, label in enumerate(tail_labels.numpy().tolist()):
            if label != IGNORE_INDEX and (k or prefix):  # a sequence's first token is predicted by nothing
                targets.append((start + k - 1 if k else prefix - 1, label, branch))
        start += len(tail_ids)
    row = {
        "input_ids": torch.cat(ids),
        "mm_token_type_ids": torch.cat(types),
        "prefix": prefix,
        "branches": branches,
        "targets": targets,
        "images": len(first.get("image_keys", first.get("image_grid_thw", []))),
        "videos": len(first.get("video_keys", first.get("video_grid_thw", []))),
    }
    for grid, pixels, keys in MEDIA:
        for key in (grid, pixels):
            if key in first:
                row[key] = first[key]
        if keys in first:
            row[keys] = list(first[keys])
    for key in PER_ITEM:  # the row's media are its first member's (all members share them)
        if key in first:
            row[key] = first[key]
    return row


def packed_inputs(rope_index: Any, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Model inputs for a packed batch: the 4D branch mask (`branch_mask`, as an additive mask in
    ``dtype``) and M-RoPE positions from each separate sequence: the batch's ``position_ids`` when
    they were computed on the host (`packed_positions`), else computed here from the batch."""
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    positions = batch.get("position_ids")
    if positions is None:  # a batch no trainer prepared (DPO's collator, direct calls): reads it
        positions = packed_positions(rope_index, batch)
    allowed = batch["packed_allowed"].to(ids.device)
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=ids.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "mm_token_type_ids": types, "attention_mask": mask, "position_ids": positions}


def packed_positions(rope_index: Any, batch: dict[str, Any]) -> torch.Tensor:
    """M-RoPE positions ``(3, rows, length)`` of a packed batch: each branch's (and the prefix's)
    positions in the branch's own sequence (prefix + branch), as ``rope_index`` (the model's
    ``get_rope_index``) computes them; padding at 0.

    ``get_rope_index`` reads every image's grid and every row's token types as Python numbers, so
    on host tensors (`eqakit.train.trainer.EqakitTrainer.get_batch_samples` calls it before the batch
    moves) it costs the accelerator nothing; on device tensors, about four reads per branch."""
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    rows, n = ids.shape
    grids, video_grids = batch.get("image_grid_thw"), batch.get("video_grid_thw")
    seconds = batch.get(VIDEO_TIMES)  # Qwen2.5-VL's, per video
    counts, video_counts = batch["image_counts"].tolist(), batch["video_counts"].tolist()
    positions = torch.zeros(3, rows, n, dtype=torch.long, device=ids.device)
    image_start = video_start = 0
    for r in range(rows):
        prefix = int(batch["packed_prefix"][r])
        grid = grids[image_start : image_start + counts[r]] if counts[r] else None
        video_grid = video_grids[video_start : video_start + video_counts[r]] if video_counts[r] else None
        times = (
            {VIDEO_TIMES: seconds[video_start : video_start + video_counts[r]]}
            if seconds is not None and video_counts[r]
            else {}
        )
        image_start += counts[r]
        video_start += video_counts[r]
        for start, length in batch["packed_branches"][r].tolist():
            seq = torch.cat([ids[r, :prefix], ids[r, start : start + length]])[None]
            seq_types = torch.cat([types[r, :prefix], types[r, start : start + length]])[None]
            if grid is not None or video_grid is not None:
                pos = rope_index(
                    seq, mm_token_type_ids=seq_types, image_grid_thw=grid, video_grid_thw=video_grid, **times
                )[0][:, 0]
            else:
                pos = torch.arange(seq.shape[1], device=ids.device).expand(3, -1)
            positions[:, r, :prefix] = pos[:, :prefix]
            positions[:, r, start : start + length] = pos[:, prefix:]
    return positions


def picked_logits(
    logits_for: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 logits of every learned token of a packed batch, with the tokens they predict and
    ``(row, branch)`` of each. Which logits to compute and pick comes from the collator
    (`target_columns`), so nothing here reads the device: one indexing with index tensors."""
    logits = logits_for(batch["packed_sources"])  # (rows, len(sources), vocab)
    picks = batch["packed_picks"].to(logits.device)
    picked = logits[picks[:, 0], picks[:, 1]].float()
    return picked, batch["packed_labels"].to(logits.device), picks[:, [0, 2]]


def packed_loss(logits_for: Any, batch: dict[str, Any], num_items: Any = None) -> torch.Tensor:
    """Cross-entropy over every branch's learned tokens: their mean (what the separate samples' loss
    averages), or, with ``num_items`` (the optimizer step's count of learned tokens), their sum
    divided by it, so that the step's micro-batches add up to the step's mean, as transformers does."""
    picked, labels, _ = picked_logits(logits_for, batch)
    if labels.shape[0] == 0:
        return picked.sum() * 0.0
    if num_items is None:
        return torch.nn.functional.cross_entropy(picked, labels)
    return torch.nn.functional.cross_entropy(picked, labels, reduction="sum") / num_items
