"""Train/test splits of OpenEQA for `eqakit prepare`.

OpenEQA is a benchmark with no train split, and its ~11 questions per episode all ask about the same
scene: a random question split (what the seed tutorial does) puts every scene in both splits, so test
scores measure memory of the scene as much as understanding. The default here splits whole episodes
and balances the seven categories across the splits as far as whole episodes allow.
"""

from __future__ import annotations

import numpy as np

from eqakit.data.openeqa import Episode
from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES


def choose_test_split(episodes: list[Episode], test_size: float, split_by: str, seed: int) -> set[str]:
    """The question ids of the test split: whole episodes (split by episode) or random questions."""
    if split_by == "question":
        ids = [q.question_id for e in episodes for q in e.questions]
        n_test = min(max(1, round(test_size * len(ids))), len(ids) - 1)
        order = np.random.default_rng(seed).permutation(len(ids))
        return {ids[i] for i in order[:n_test]}
    counts = np.array(
        [[sum(q.category == c for q in e.questions) for c in OPENEQA_CATEGORIES] for e in episodes]
    )
    chosen = split_episodes(counts, test_size, seed)
    return {q.question_id for i in np.flatnonzero(chosen) for q in episodes[i].questions}


def split_episodes(counts: np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Choose test episodes (a boolean mask) so each category's test share is close to `test_size`.

    `counts[e, c]` is episode e's number of questions in category c. The cost is the squared distance
    between the test split's per-category counts and their targets; a seeded greedy pass over a shuffled
    episode order is refined by single additions, removals and swaps until none lowers the cost. Both
    splits keep at least one episode.
    """
    counts = counts.astype(float)
    target = counts.sum(axis=0) * test_size
    n = len(counts)
    in_test = np.zeros(n, dtype=bool)
    total = np.zeros(counts.shape[1])

    def cost(v: np.ndarray) -> np.ndarray:
        return ((v - target) ** 2).sum(axis=-1)

    for e in np.random.default_rng(seed).permutation(n):
        if cost(total + counts[e]) < cost(total):
            in_test[e], total = True, total + counts[e]
    if not in_test.any():  # a tiny test_size: take the single best episode
        e = int(np.argmin(cost(total + counts)))
        in_test[e], total = True, total + counts[e]
    if in_test.all():  # a test_size near 1: give one back
        e = int(np.argmin(cost(total - counts)))
        in_test[e], total = False, total - counts[e]
    while True:
        test, train = np.flatnonzero(in_test), np.flatnonzero(~in_test)
        moves = [(cost(total), None, None)]
        if len(train) > 1:
            add = cost(total + counts[train])
            moves.append((add.min(), None, train[add.argmin()]))
        if len(test) > 1:
            remove = cost(total - counts[test])
            moves.append((remove.min(), test[remove.argmin()], None))
        swap = cost(total - counts[test][:, None] + counts[train][None, :])
        t, r = np.unravel_index(swap.argmin(), swap.shape)
        moves.append((swap[t, r], test[t], train[r]))
        best = min(range(len(moves)), key=lambda i: moves[i][0])
        if moves[best][0] >= moves[0][0] - 1e-9:
            return in_test
        _, out_, in_ = moves[best]
        if out_ is not None:
            in_test[out_], total = False, total - counts[out_]
        if in_ is not None:
            in_test[in_], total = True, total + counts[in_]
