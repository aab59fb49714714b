"""Classic machine-learning operators of the ``ai.onnx.ml`` domain, as written by skl2onnx and onnxmltools.

Tree ensembles (``TreeEnsemble`` from ai.onnx.ml opset 5, and the older ``TreeEnsembleRegressor`` /
``TreeEnsembleClassifier``) are decoded into one flat table of interior nodes and one of leaves, then evaluated for
the whole batch and every tree at once: each step moves every (sample, tree) pointer one level down, so the number
of steps is the depth of the deepest tree. A pointer ``p >= 0`` is an interior node; ``p < 0`` is leaf ``-p - 1``.
Trees are piecewise constant, so they pass no gradient to their input. Aggregation, base values, post transforms
and the binary-classifier conventions follow onnxruntime, the reference the converted models are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ....errors import InvalidParameterError, UnsupportedOperatorError
from .util import as_tensor
from ..registry import NodeContext, OpSet

ops = OpSet()

ML = "ai.onnx.ml"

_MODES = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ", "BRANCH_MEMBER")
_AGGREGATES = ("AVERAGE", "SUM", "MIN", "MAX")
_TRANSFORMS = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")


@ops.register("ArrayFeatureExtractor", domain=ML)
def array_feature_extractor(ctx: NodeContext, x: Any, indices: Any) -> torch.Tensor:
    """The entries ``indices`` of the last axis of ``x`` (a 1-D ``x`` gives a (1, k) result, as onnxruntime)."""
    x = as_tensor(x)
    out = x.index_select(-1, as_tensor(indices).reshape(-1).long())
    return out.unsqueeze(0) if x.dim() == 1 else out


@ops.register("Binarizer", domain=ML)
def binarizer(ctx: NodeContext, x: Any) -> torch.Tensor:
    """1 where ``x > threshold``, else 0, in ``x``'s dtype."""
    x = as_tensor(x)
    return (x > float(ctx.attr("threshold", 0.0))).to(x.dtype)


@dataclass
class _Forest:
    """Interior nodes (K), leaves (L) and tree roots (T) of an ensemble, as tensors."""

    feature: torch.Tensor  # (K,) int64
    threshold: torch.Tensor  # (K,) float64
    mode: torch.Tensor  # (K,) int64 index into _MODES
    true_next: torch.Tensor  # (K,) int64 pointer
    false_next: torch.Tensor  # (K,) int64 pointer
    nan_true: torch.Tensor  # (K,) bool
    members: torch.Tensor  # (K, M) float64, NaN-padded sets of BRANCH_MEMBER nodes
    roots: torch.Tensor  # (T,) int64 pointer
    leaf_weight: torch.Tensor  # (L, n_targets) float64
    leaf_votes: torch.Tensor  # (L, n_targets) bool: the leaf votes for that target


def _members_table(modes: Sequence[int], values: torch.Tensor | None) -> torch.Tensor:
    """The NaN-delimited ``membership_values`` split over the BRANCH_MEMBER nodes, as a NaN-padded table."""
    member_nodes = [i for i, m in enumerate(modes) if m == 6]
    table = torch.full((len(modes), 1), math.nan, dtype=torch.float64)
    if not member_nodes or values is None:
        return table
    flat = values.to(torch.float64).reshape(-1).tolist()
    sets, current = [], []
    for v in flat:
        if math.isnan(v):
            sets.append(current)
            current = []
        else:
            current.append(v)
    if current or len(sets) < len(member_nodes):
        sets.append(current)
    width = max(1, max(len(s) for s in sets))
    table = torch.full((len(modes), width), math.nan, dtype=torch.float64)
    for node, members in zip(member_nodes, sets):
        table[node, : len(members)] = torch.tensor(members, dtype=torch.float64)
    return table


def _forest_v5(ctx: NodeContext) -> _Forest:
    """The TreeEnsemble (opset 5) encoding: leaves referenced by index through nodes_{true,false}leafs."""
    feature = list(ctx.attr("nodes_featureids", []))
    n = len(feature)
    modes = [int(m) for m in as_tensor(ctx.attr("nodes_modes", torch.zeros(n, dtype=torch.uint8))).reshape(-1)]

    def pointers(ids_name: str, leaf_name: str) -> torch.Tensor:
        ids, leafs = ctx.attr(ids_name, []), ctx.attr(leaf_name, [0] * n)
        return torch.tensor([-(i + 1) if leaf else i for i, leaf in zip(ids, leafs)], dtype=torch.int64)

    n_targets = int(ctx.attr("n_targets", 1))
    target_ids = torch.tensor(list(ctx.attr("leaf_targetids", [])), dtype=torch.int64)
    weights = as_tensor(ctx.attr("leaf_weights")).reshape(-1).to(torch.float64)
    rows = torch.arange(len(target_ids))
    leaf_weight = torch.zeros(len(target_ids), n_targets, dtype=torch.float64)
    leaf_weight[rows, target_ids] = weights
    leaf_votes = torch.zeros(len(target_ids), n_targets, dtype=torch.bool)
    leaf_votes[rows, target_ids] = True
    splits = ctx.attr("nodes_splits")
    return _Forest(
        feature=torch.tensor(feature, dtype=torch.int64),
        threshold=as_tensor(splits).reshape(-1).to(torch.float64)
        if splits is not None
        else torch.zeros(n, dtype=torch.float64),
        mode=torch.tensor(modes, dtype=torch.int64),
        true_next=pointers("nodes_truenodeids", "nodes_trueleafs"),
        false_next=pointers("nodes_falsenodeids", "nodes_falseleafs"),
        nan_true=torch.tensor(list(ctx.attr("nodes_missing_value_tracks_true", [0] * n)), dtype=torch.bool),
        members=_members_table(
            modes, as_tensor(ctx.attr("membership_values")) if ctx.attr("membership_values") is not None else None
        ),
        roots=torch.tensor(list(ctx.attr("tree_roots", [0])), dtype=torch.int64),
        leaf_weight=leaf_weight,
        leaf_votes=leaf_votes,
    )


def _floats(ctx: NodeContext, name: str) -> list[float] | None:
    """A float-list attribute, or its ``*_as_tensor`` double variant."""
    tensor = ctx.attr(f"{name}_as_tensor")
    if tensor is not None:
        return as_tensor(tensor).reshape(-1).tolist()
    value = ctx.attr(name)
    return list(value) if value is not None else None


def _forest_legacy(ctx: NodeContext, vote_prefix: str, vote_id: str, n_targets: int) -> _Forest:
    """The TreeEnsembleRegressor/Classifier encoding: nodes by (tree id, node id), LEAF nodes, votes at leaves."""
    trees, ids = list(ctx.attr("nodes_treeids", [])), list(ctx.attr("nodes_nodeids", []))
    modes = list(ctx.attr("nodes_modes", []))
    thresholds = _floats(ctx, "nodes_values") or [0.0] * len(trees)
    nan_true = list(ctx.attr("nodes_missing_value_tracks_true", [0] * len(trees)))
    interior, leaves = {}, {}
    for k, (tree, node, mode) in enumerate(zip(trees, ids, modes)):
        table = leaves if mode == "LEAF" else interior
        table[(tree, node)] = len(table)
    unknown = {m for m in modes if m != "LEAF" and m not in _MODES}
    if unknown:
        raise UnsupportedOperatorError(
            ctx.op_type, ctx.domain, ctx.opset, ctx.name, hint=f"node modes {sorted(unknown)}"
        )

    def pointer(tree: int, node: int) -> int:
        if (tree, node) in interior:
            return interior[(tree, node)]
        if (tree, node) in leaves:
            return -leaves[(tree, node)] - 1
        raise InvalidParameterError(f"{ctx.op_type} node '{ctx.name}' refers to a missing tree node ({tree}, {node}).")

    inner = [k for k, m in enumerate(modes) if m != "LEAF"]
    true_ids, false_ids = ctx.attr("nodes_truenodeids", []), ctx.attr("nodes_falsenodeids", [])
    children = {(trees[k], true_ids[k]) for k in inner} | {(trees[k], false_ids[k]) for k in inner}
    roots: dict[int, int] = {}
    for tree, node in zip(trees, ids):
        if tree not in roots and (tree, node) not in children:
            roots[tree] = pointer(tree, node)
    leaf_weight = torch.zeros(len(leaves), n_targets, dtype=torch.float64)
    leaf_votes = torch.zeros(len(leaves), n_targets, dtype=torch.bool)
    weights = _floats(ctx, f"{vote_prefix}_weights") or []
    vote_trees, vote_nodes = ctx.attr(f"{vote_prefix}_treeids", []), ctx.attr(f"{vote_prefix}_nodeids", [])
    for tree, node, target, weight in zip(vote_trees, vote_nodes, ctx.attr(vote_id, []), weights):
        if (tree, node) in leaves:
            leaf = leaves[(tree, node)]
            leaf_weight[leaf, target] += weight
            leaf_votes[leaf, target] = True
    return _Forest(
        feature=torch.tensor([ctx.attr("nodes_featureids")[k] for k in inner], dtype=torch.int64),
        threshold=torch.tensor([thresholds[k] for k in inner], dtype=torch.float64),
        mode=torch.tensor([_MODES.index(modes[k]) for k in inner], dtype=torch.int64),
        true_next=torch.tensor([pointer(trees[k], true_ids[k]) for k in inner], dtype=torch.int64),
        false_next=torch.tensor([pointer(trees[k], false_ids[k]) for k in inner], dtype=torch.int64),
        nan_true=torch.tensor([bool(nan_true[k]) for k in inner], dtype=torch.bool),
        members=torch.full((len(inner), 1), math.nan, dtype=torch.float64),
        roots=torch.tensor(list(roots.values()), dtype=torch.int64),
        leaf_weight=leaf_weight,
        leaf_votes=leaf_votes,
    )


def _leaves(forest: _Forest, x: torch.Tensor) -> torch.Tensor:
    """The leaf each (sample, tree) ends in: (N, T) int64."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    ptr = forest.roots.to(x.device).expand(x.shape[0], -1).clone()
    f = {k: v.to(x.device) for k, v in vars(forest).items()}
    for _ in range(f["feature"].numel() + 1):
        active = ptr >= 0
        if not bool(active.any()):
            break
        node = ptr.clamp(min=0)
        value, split, mode = x.gather(1, f["feature"][node]), f["threshold"][node], f["mode"][node]
        tests = torch.stack(
            [
                value <= split,
                value < split,
                value >= split,
                value > split,
                value == split,
                value != split,
                (value.unsqueeze(-1) == f["members"][node]).any(-1),
            ]
        )
        go_true = tests.gather(0, mode.unsqueeze(0)).squeeze(0) | (torch.isnan(value) & f["nan_true"][node])
        step = torch.where(go_true, f["true_next"][node], f["false_next"][node])
        ptr = torch.where(active, step, ptr)
    return -ptr - 1


def _aggregate(forest: _Forest, leaves: torch.Tensor, how: str) -> torch.Tensor:
    """Per-target scores (N, n_targets) from the leaves reached (targets no tree voted for score 0)."""
    weight, votes = forest.leaf_weight.to(leaves.device)[leaves], forest.leaf_votes.to(leaves.device)[leaves]
    voted = votes.any(1)
    if how in ("SUM", "AVERAGE"):
        score = torch.where(votes, weight, torch.zeros_like(weight)).sum(1)
        return score / max(leaves.shape[1], 1) if how == "AVERAGE" else score
    fill = math.inf if how == "MIN" else -math.inf
    picked = torch.where(votes, weight, torch.full_like(weight, fill))
    score = picked.amin(1) if how == "MIN" else picked.amax(1)
    return torch.where(voted, score, torch.zeros_like(score))


def _post_transform(score: torch.Tensor, how: str) -> torch.Tensor:
    if how == "NONE":
        return score
    if how == "SOFTMAX":
        return torch.softmax(score, dim=-1)
    if how == "LOGISTIC":
        return torch.sigmoid(score)
    if how == "SOFTMAX_ZERO":  # zeros stay zero and take no share
        nonzero = score.abs() > 1e-7
        exp = torch.where(nonzero, torch.exp(score - score.amax(-1, keepdim=True)), torch.zeros_like(score))
        return exp / exp.sum(-1, keepdim=True).clamp(min=1e-300)
    if how == "PROBIT":
        return math.sqrt(2.0) * torch.erfinv(2 * score - 1)
    raise InvalidParameterError(f"unknown post_transform '{how}'; expected one of {', '.join(_TRANSFORMS)}")


def _enum(ctx: NodeContext, name: str, names: Sequence[str], default: str) -> str:
    value = ctx.attr(name, default)
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise InvalidParameterError(
                f"{ctx.op_type} node '{ctx.name}': {name}={value} is not one of 0..{len(names) - 1}."
            )
        return names[value]
    if value not in names:
        raise InvalidParameterError(
            f"{ctx.op_type} node '{ctx.name}': {name}='{value}' is not one of {', '.join(names)}."
        )
    return value


def _with_base(score: torch.Tensor, base: list[float] | None) -> torch.Tensor:
    return score + torch.tensor(base, dtype=score.dtype, device=score.device) if base else score


@ops.register("TreeEnsemble", since=5, domain=ML)
def tree_ensemble(ctx: NodeContext, x: Any) -> torch.Tensor:
    """Tree ensemble (ai.onnx.ml opset 5): (N, F) -> (N, n_targets) in ``x``'s dtype."""
    x = as_tensor(x)
    forest = _forest_v5(ctx)
    score = _aggregate(forest, _leaves(forest, x), _enum(ctx, "aggregate_function", _AGGREGATES, "SUM"))
    return _post_transform(score, _enum(ctx, "post_transform", _TRANSFORMS, "NONE")).to(x.dtype)


@ops.register("TreeEnsembleRegressor", domain=ML)
def tree_ensemble_regressor(ctx: NodeContext, x: Any) -> torch.Tensor:
    """Legacy tree-ensemble regressor: (N, F) -> float32 (N, n_targets), base values added after aggregation."""
    n_targets = int(ctx.attr("n_targets", 1))
    forest = _forest_legacy(ctx, "target", "target_ids", n_targets)
    score = _aggregate(forest, _leaves(forest, as_tensor(x)), _enum(ctx, "aggregate_function", _AGGREGATES, "SUM"))
    score = _with_base(score, _floats(ctx, "base_values"))
    return _post_transform(score, _enum(ctx, "post_transform", _TRANSFORMS, "NONE")).to(torch.float32)


@ops.register("TreeEnsembleClassifier", domain=ML)
def tree_ensemble_classifier(ctx: NodeContext, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy tree-ensemble classifier: (labels (N,) int64, scores (N, n_classes) float32).

    Two-class models whose votes all go to one class (skl2onnx's binary forests and boosters) carry one score
    ``s`` per sample; see `_binary_scores` for how it becomes a label and a pair of scores.
    """
    labels = ctx.attr("classlabels_int64s")
    if labels is None:
        raise UnsupportedOperatorError(
            ctx.op_type, ctx.domain, ctx.opset, ctx.name, hint="string class labels are not supported"
        )
    labels_t = torch.tensor(list(labels), dtype=torch.int64)
    forest = _forest_legacy(ctx, "class", "class_ids", len(labels))
    score = _aggregate(forest, _leaves(forest, as_tensor(x)), "SUM")
    transform = _enum(ctx, "post_transform", _TRANSFORMS, "NONE")
    base = _floats(ctx, "base_values") or []
    voted_classes = set(ctx.attr("class_ids", []))
    if len(labels) == 2 and len(voted_classes) == 1:
        probabilities = all(w >= 0 for w in _floats(ctx, "class_weights") or [])
        positive, pair = _binary_scores(score, base, voted_classes.pop(), probabilities, transform)
        return torch.where(positive, labels_t[1], labels_t[0]), pair.to(torch.float32)
    score = _with_base(score, base)
    return labels_t[score.argmax(-1)], _post_transform(score, transform).to(torch.float32)


def _binary_scores(
    score: torch.Tensor, base: list[float], voted_class: int, probabilities: bool, transform: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each sample is of the second class, and its (N, 2) scores, as onnxruntime computes them.

    The single score ``s`` (plus the first base value) picks the second class when it exceeds 0.5 if every vote
    weight is non-negative (a probability), else 0 (a margin). The pair is (1 - s, s) for probabilities, (-s, s)
    for margins, (sigmoid(-s), sigmoid(s)) with a LOGISTIC transform. Two base values, or votes for the second
    class only, give the pair [s, 0] or [0, s] put through the post transform.
    """
    zeros = torch.zeros_like(score[:, 0])
    if voted_class == 1:
        # onnxruntime replaces the votes by the second base value when there are two
        s = torch.full_like(zeros, base[1]) if len(base) == 2 else score[:, 1]
        pair = _post_transform(torch.stack([zeros, s], -1), transform)
    elif len(base) == 2:
        s = score[:, 0] + base[0]
        pair = _post_transform(torch.stack([s, zeros], -1), transform)
    else:
        s = score[:, 0] + (base[0] if base else 0.0)
        if transform == "LOGISTIC":
            pair = torch.stack([torch.sigmoid(-s), torch.sigmoid(s)], -1)
        else:
            pair = torch.stack([1 - s if probabilities else -s, s], -1)
    return s > (0.5 if probabilities else 0.0), pair
