"""Active-learning acquisition: which unlabelled images an expert should label next.

Every strategy but ``random`` and ``coreset`` scores one image at a time, so it can be the
priority of an annotation request (the annotate queue serves the highest first):

``uncertainty``
    Least confident label: ``1 - 2 |p - 0.5|`` of the least sure calibrated score, and 1.0
    for an image flagged ``novel`` (:func:`phenocascade.streams.events.uncertainty`, the
    queue's priority; computed there, since this module sees probabilities only).
``margin``
    ``1 -`` the smallest gap between the two most probable labels of a softmax group; a
    label outside any group is a yes/no pair, gap ``|2p - 1|`` (Scheffer et al. 2001).
``entropy``
    Shannon entropy of each group's distribution (a lone label's yes/no pair), summed over
    groups, in bits (Settles 2009, section 3.1).
``bald``
    Mutual information between the prediction and the model's weights, estimated from
    Monte-Carlo dropout samples: the entropy of the mean prediction minus the mean entropy
    of the samples, summed over groups (Houlsby et al. 2011, arXiv:1112.5745; Gal, Islam
    and Ghahramani 2017, arXiv:1703.02910).

``coreset`` picks a whole batch at once: greedy k-centres on the model's embeddings, each
pick the unlabelled image farthest from every labelled or already picked one (Sener and
Savarese 2018, arXiv:1708.00489). ``random`` draws uniformly; as the annotate queue's
order it is arrival order (one priority for every image), an unbiased sample of the
images a tier asks about.

For a binary label (the quality gate) ``uncertainty``, ``margin`` and ``entropy`` rank
images identically: each is a decreasing function of ``|p - 0.5|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from phenocascade.errors import ConfigError

Strategy = Literal["uncertainty", "margin", "entropy", "bald", "coreset", "random"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
# The priority of every image under ``random``: the queue serves them in arrival order.
RANDOM_PRIORITY = 0.5
_EPS = 1e-12


def group_columns(classes: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[int]]:
    """Return the column indices of each softmax group, then each remaining label alone.

    Parameters
    ----------
    classes : sequence of str
        The columns of the probability matrices, in order.
    groups : sequence of sequence of str
        Labels that exclude each other (one softmax); every other class is a yes/no label.

    Raises
    ------
    ConfigError
        If a group names a label that is not a class.
    """
    index = {c: i for i, c in enumerate(classes)}
    columns: list[list[int]] = []
    for group in groups:
        unknown = [label for label in group if label not in index]
        if unknown:
            raise ConfigError(f"group {list(group)} names {unknown}, not classes of {classes}")
        columns.append([index[label] for label in group])
    grouped = {i for cols in columns for i in cols}
    return columns + [[i] for i in range(len(classes)) if i not in grouped]


def _distributions(
    probs: npt.NDArray[np.float64], columns: Sequence[Sequence[int]]
) -> list[npt.NDArray[np.float64]]:
    """Return each group's distribution ``(..., k)``, a lone label as ``(p, 1 - p)``.

    A group's calibrated scores need not sum to one exactly; they are renormalised.
    """
    out = []
    for cols in columns:
        if len(cols) == 1:
            p = np.clip(probs[..., cols[0]], 0.0, 1.0)
            out.append(np.stack([p, 1.0 - p], axis=-1))
        else:
            q = np.clip(probs[..., list(cols)], _EPS, None)
            out.append(q / q.sum(axis=-1, keepdims=True))
    return out


def _entropy_bits(dist: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Entropy in bits over the last axis."""
    q = np.clip(dist, _EPS, 1.0)
    return np.asarray(-(q * np.log2(q)).sum(axis=-1), dtype=np.float64)


def priority(
    strategy: Literal["margin", "entropy"],
    probs: npt.NDArray[np.float64],
    columns: Sequence[Sequence[int]],
) -> npt.NDArray[np.float64]:
    """Return each image's priority by ``margin`` or ``entropy``, shape ``(N,)``.

    Parameters
    ----------
    strategy : {"margin", "entropy"}
        ``margin``: ``1 -`` the smallest top-two gap over the image's groups, in
        ``[0, 1]``; ``entropy``: the groups' entropies summed, in bits.
    probs : ndarray, shape (N, C)
        Calibrated scores, columns as :func:`group_columns` indexes them.
    columns : sequence of sequence of int
        From :func:`group_columns`.
    """
    dists = _distributions(probs, columns)
    if strategy == "entropy":
        return np.asarray(np.sum([_entropy_bits(d) for d in dists], axis=0), dtype=np.float64)
    gaps = [np.diff(np.sort(d, axis=-1)[..., -2:], axis=-1)[..., 0] for d in dists]
    return np.asarray(1.0 - np.min(gaps, axis=0), dtype=np.float64)


def bald(
    samples: npt.NDArray[np.float64], columns: Sequence[Sequence[int]]
) -> npt.NDArray[np.float64]:
    """Return each image's BALD score in bits, shape ``(N,)``.

    Parameters
    ----------
    samples : ndarray, shape (T, N, C)
        ``T`` stochastic predictions (Monte-Carlo dropout) of ``N`` images.
    columns : sequence of sequence of int
        From :func:`group_columns`.

    Raises
    ------
    ConfigError
        If there are fewer than two samples.
    """
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise ConfigError(f"BALD needs (T >= 2, N, C) samples, got shape {samples.shape}")
    score = np.zeros(samples.shape[1])
    for dist in _distributions(samples, columns):  # (T, N, k)
        score += _entropy_bits(dist.mean(axis=0)) - _entropy_bits(dist).mean(axis=0)
    return np.asarray(np.clip(score, 0.0, None), dtype=np.float64)


def max_bits(columns: Sequence[Sequence[int]]) -> float:
    """Return the largest entropy (and BALD score) the groups can have, in bits.

    Dividing by it maps ``entropy`` and ``bald`` onto ``[0, 1]``, the queue's priorities.
    """
    return float(sum(np.log2(max(len(cols), 2)) for cols in columns))


def k_centres(
    features: npt.NDArray[np.float64], labelled: Sequence[int], candidates: Sequence[int], k: int
) -> list[int]:
    """Pick ``k`` candidates by greedy k-centres (core-set) on ``features``.

    Parameters
    ----------
    features : ndarray, shape (N, D)
        Embeddings of every image, labelled and not.
    labelled : sequence of int
        Rows already labelled (the centres to start from; may be empty).
    candidates : sequence of int
        Rows that may be picked.
    k : int
        How many to pick (fewer if there are fewer candidates).

    Returns
    -------
    list of int
        Picked rows in the order picked: each the candidate farthest (Euclidean) from
        every labelled and already picked row; ties go to the earlier candidate.
    """
    pool = np.asarray(candidates, dtype=np.int64)
    if len(pool) == 0 or k <= 0:
        return []
    x = features[pool]
    nearest = np.full(len(pool), np.inf)
    for row in labelled:
        nearest = np.minimum(nearest, np.linalg.norm(x - features[row], axis=1))
    picked: list[int] = []
    for _ in range(min(k, len(pool))):
        # With nothing labelled every distance is infinite and the first candidate starts.
        j = int(np.argmax(nearest))
        picked.append(int(pool[j]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[j], axis=1))
        nearest[j] = -np.inf
    return picked
