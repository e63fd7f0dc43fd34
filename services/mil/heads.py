"""Multiple-instance heads: one bag of patch embeddings in, T task logits out.

Both heads take a bag as a float tensor (N, D), or a batch of one (1, N, D), and
return :class:`MilOutput`: ``logits`` (T,), one per task (biomarker), and
``attention`` (T, N), one non-negative map per task that sums to 1 over the bag's
instances, for heatmaps of each biomarker.

- :class:`GatedAttentionMIL` (Ilse, Tomczak, Welling 2018, "Attention-based deep
  multiple instance learning"), multi-branch: a shared projection and gated
  attention layer, then one attention vector ``w_t`` and one linear classifier per
  task. Linear in N in time and memory.
- :class:`TransformerMIL`: a projection, one learnable class token per task,
  and pre-norm transformer encoder layers over [class tokens; instances]; each task's
  logit comes from its class token, and its attention map is that token's attention
  to the instances in the last layer, averaged over heads. Self-attention among
  instances is quadratic in N, so a bag longer than ``max_instances`` is cut to a
  random sample of that many: a fresh sample each step in training (an
  augmentation), a fixed one (seeded by N) in evaluation so predictions repeat.
  Instances left out get attention 0. The last layer only updates the class tokens
  (nothing reads the instances after it), which keeps its cost linear in N.

:func:`build_head` makes either by name.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import InvalidInput
from services.common.vocabulary import BIOMARKERS

#: Instances the transformer attends to at most (see the module docstring).
TRANSFORMER_MAX_INSTANCES = 2048


class MilOutput(NamedTuple):
    """What a head returns for one bag.

    Attributes:
        logits: (T,) one logit per task; sigmoid gives the uncalibrated probability.
        attention: (T, N) per-task attention over the bag's instances, each row
            summing to 1.
    """

    logits: torch.Tensor
    attention: torch.Tensor


def _as_bag(x: torch.Tensor, in_dim: int) -> torch.Tensor:
    """(N, D) from (N, D) or (1, N, D); InvalidInput on anything else."""
    if x.dim() == 3:
        if x.shape[0] != 1:
            raise InvalidInput(f"a MIL head scores one bag at a time, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise InvalidInput(f"bag must be (N, {in_dim}) or (1, N, {in_dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInput("bag has no instances (N = 0); nothing to score")
    return x


class _TaskLinear(nn.Module):
    """T independent linear classifiers, task t applied to row t of a (T, h) input."""

    def __init__(self, n_tasks: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_tasks, dim))
        self.bias = nn.Parameter(torch.zeros(n_tasks))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled * self.weight).sum(dim=-1) + self.bias


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL with one attention branch and classifier per task.

    h_i = dropout(ReLU(W x_i)); a_ti = w_t^T (tanh(V h_i) ⊙ sigmoid(U h_i));
    A_t = softmax_i(a_t); z_t = Σ_i A_ti h_i; logit_t = c_t^T z_t + b_t.

    Args:
        in_dim: D, the embedding width.
        n_tasks: T, the number of tasks.
        hidden_dim: Width h of the projection.
        attention_dim: Width of the gated attention layer.
        dropout: Dropout after the projection (training only).
    """

    name = "abmil"

    def __init__(
        self,
        in_dim: int,
        n_tasks: int = len(BIOMARKERS),
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        _check_sizes(in_dim=in_dim, n_tasks=n_tasks, hidden_dim=hidden_dim)
        self.in_dim, self.n_tasks = in_dim, n_tasks
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, n_tasks)
        self.classify = _TaskLinear(n_tasks, hidden_dim)

    def forward(self, x: torch.Tensor) -> MilOutput:
        h = self.project(_as_bag(x, self.in_dim))  # (N, h)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = torch.softmax(self.attention_w(gate).T, dim=1)  # (T, N)
        pooled = attention @ h  # (T, h)
        return MilOutput(self.classify(pooled), attention)


class _EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer that can update only its first rows.

    x <- x + MHA(LN(x)); x <- x + FF(LN(x)), with the multi-head attention of
    ``torch.nn.functional.scaled_dot_product_attention``. With ``queries=q`` only the
    first q rows are updated (and returned), attending to all rows, and the
    head-averaged attention of those q rows is returned as well.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attention = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, dim = x.shape
        q_rows = n if queries is None else queries
        per_head = dim // self.heads
        normed = self.norm_attention(x)
        q, k, v = self.qkv(normed).split(dim, dim=-1)
        q = q[:q_rows].reshape(q_rows, self.heads, per_head).transpose(0, 1)
        k = k.reshape(n, self.heads, per_head).transpose(0, 1)
        v = v.reshape(n, self.heads, per_head).transpose(0, 1)
        weights: torch.Tensor | None = None
        if queries is None:
            mixed = F.scaled_dot_product_attention(q, k, v)
        else:
            # Few query rows: the explicit softmax is cheap (q x N) and readable.
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(per_head), dim=-1)
            mixed = weights @ v
            weights = weights.mean(dim=0)  # (q, N) averaged over heads
        mixed = mixed.transpose(0, 1).reshape(q_rows, dim)
        y = x[:q_rows] + self.dropout(self.out(mixed))
        y = y + self.dropout(self.ff(self.norm_ff(y)))
        return y, weights


class TransformerMIL(nn.Module):
    """Transformer over a bag with one learnable class token per task.

    Args:
        in_dim: D, the embedding width.
        n_tasks: T, the number of tasks (and class tokens).
        hidden_dim: Model width (divisible by ``heads``).
        heads: Attention heads.
        layers: Encoder layers (>= 1); all but the last update every token.
        dropout: Dropout in projection, attention output and feed-forward.
        max_instances: Cap on the instances attended to (module docstring).
    """

    name = "transmil"

    def __init__(
        self,
        in_dim: int,
        n_tasks: int = len(BIOMARKERS),
        hidden_dim: int = 256,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
        max_instances: int = TRANSFORMER_MAX_INSTANCES,
    ) -> None:
        super().__init__()
        _check_sizes(in_dim=in_dim, n_tasks=n_tasks, hidden_dim=hidden_dim, heads=heads)
        _check_sizes(layers=layers, max_instances=max_instances)
        if hidden_dim % heads:
            raise InvalidInput(f"hidden_dim {hidden_dim} must be divisible by heads {heads}")
        self.in_dim, self.n_tasks, self.max_instances = in_dim, n_tasks, max_instances
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.class_tokens = nn.Parameter(torch.randn(n_tasks, hidden_dim) * 0.02)
        self.layers = nn.ModuleList(
            _EncoderLayer(hidden_dim, heads, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.classify = _TaskLinear(n_tasks, hidden_dim)

    def _sample(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the instances to keep, or None to keep all."""
        if n <= self.max_instances:
            return None
        if self.training:
            order = torch.randperm(n, device="cpu")
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        return order[: self.max_instances].sort().values.to(device)

    def forward(self, x: torch.Tensor) -> MilOutput:
        x = _as_bag(x, self.in_dim)
        n = x.shape[0]
        kept = self._sample(n, x.device)
        if kept is not None:
            x = x[kept]
        tokens = torch.cat([self.class_tokens, self.project(x)])
        for layer in self.layers[:-1]:
            tokens, _ = layer(tokens)
        last = self.layers[-1]
        heads_out, weights = last(tokens, queries=self.n_tasks)
        assert weights is not None
        # Attention to the instances only, renormalized (class tokens also attend to
        # one another, which a heatmap has no place for).
        to_instances = weights[:, self.n_tasks :]
        to_instances = to_instances / to_instances.sum(dim=1, keepdim=True).clamp_min(1e-12)
        if kept is not None:
            full = to_instances.new_zeros(self.n_tasks, n)
            full[:, kept] = to_instances
            to_instances = full
        return MilOutput(self.classify(self.norm(heads_out)), to_instances)


#: Head names -> classes. "transformer" is an alias of "transmil".
HEADS: dict[str, type[nn.Module]] = {
    "abmil": GatedAttentionMIL,
    "transmil": TransformerMIL,
    "transformer": TransformerMIL,
}


def build_head(name: str, in_dim: int, n_tasks: int = len(BIOMARKERS), **options: Any) -> nn.Module:
    """A MIL head by name.

    Args:
        name: ``abmil`` (:class:`GatedAttentionMIL`) or ``transmil`` / ``transformer``
            (:class:`TransformerMIL`).
        in_dim: D, the embedding width.
        n_tasks: T, the number of tasks.
        **options: The head's other constructor arguments (e.g. ``hidden_dim``).

    Raises:
        InvalidInput: Unknown name, unknown option or bad sizes.
    """
    try:
        cls = HEADS[name]
    except KeyError:
        raise InvalidInput(f"unknown MIL head {name!r}; use one of {', '.join(HEADS)}") from None
    try:
        return cls(in_dim, n_tasks, **options)
    except TypeError as exc:
        raise InvalidInput(f"MIL head {name!r}: {exc}") from None


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
