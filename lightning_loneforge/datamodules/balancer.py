"""Cost-aware balancing across data-parallel ranks: equal tokens are not equal work.

A sample of `n` tokens costs about `a * n**2 + b * n + c` (attention grows with the square of the sample's
length, everything else linearly, plus a fixed per-sample overhead). The balancer works **at pack
construction**: every rank packs its own stream, and the packer closes a pack once it holds `cost_budget`,
a number every rank derives from the same config. Every rank's pack of a step then costs about the same,
so the assignment is deterministic and rank-consistent by construction: no communication, no extra pass
over the data, no rank waiting for another's samples.

Fitting `a, b, c` from measured step times: log, for a few hundred steps, the step time `t_s` and each
pack's `S1 = sum(n)`, `S2 = sum(n**2)` and sample count `S0` (`PackingMetricsCallback` logs them as
`data/tokens_per_pack`, `data/sum_sq_tokens`, `data/samples_per_pack`), then
solve the least-squares problem `t_s ~ a * S2 + b * S1 + c * S0` (`CostModel.fit`). Only the ratios matter;
`CostModel.fit` scales the result so that `b == 1` (cost in "linear-token" units). For a decoder of
`d` hidden size, `L` layers and `N` parameters a first guess is `a = 2 * d * L / (6 * N) * 3 ~ d * L / N`
(causal attention over `n**2 / 2` pairs, forward + backward), e.g. 2.8e-5 for Qwen2-VL-2B's LLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CostModel:
    """Per-sample cost `a * n**2 + b * n + c` of `n` tokens, in units of one linear token (`b = 1`)."""

    a: float = 2.8e-5
    """Quadratic (attention) coefficient."""
    b: float = 1.0
    """Linear coefficient (matmuls, norms, loss)."""
    c: float = 0.0
    """Fixed per-sample overhead."""

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c) < 0 or self.a + self.b <= 0:
            raise ValueError(f"cost coefficients must be >= 0 with a + b > 0, got {self}")

    def __call__(self, tokens: int) -> float:
        return self.a * tokens * tokens + self.b * tokens + self.c

    def pack_cost(self, lengths: Sequence[int]) -> float:
        return sum(self(n) for n in lengths)

    def max_tokens_within(self, budget: float) -> int:
        """The longest sample whose cost is at most `budget` (the inverse of `__call__`)."""
        rest = budget - self.c
        if rest < 0:
            return 0
        if self.a == 0:
            return int(rest / self.b)
        return int((-self.b + math.sqrt(self.b * self.b + 4 * self.a * rest)) / (2 * self.a))

    def budget_for(self, max_tokens: int, typical_tokens: int) -> float:
        """A per-pack cost budget every rank can reach: a full row of samples of `typical_tokens` each."""
        per_sample = max(1, typical_tokens)
        return max_tokens / per_sample * self(per_sample)

    @classmethod
    def fit(cls, pack_lengths: Sequence[Sequence[int]], step_times: Sequence[float]) -> CostModel:
        """Least-squares fit of `a, b, c` (clamped at 0, normalised to `b = 1`) from packs and step times.

        Args:
            pack_lengths: For each measured step, the sample lengths of the pack (of the slowest rank).
            step_times: The measured step time of each of those steps.
        """
        if len(pack_lengths) != len(step_times) or len(step_times) < 3:
            raise ValueError("need at least 3 steps, with one list of sample lengths per step time")
        rows = [[sum(n * n for n in p), sum(p), len(p)] for p in pack_lengths]
        x = torch.tensor(rows, dtype=torch.float64)
        y = torch.tensor(step_times, dtype=torch.float64).unsqueeze(1)
        scale = x.abs().amax(0).clamp_min(1e-12)
        coef = torch.linalg.lstsq(x / scale, y).solution.squeeze(1) / scale
        a, b, c = (max(0.0, float(v)) for v in coef)
        if b <= 0:
            raise ValueError("fitted linear coefficient is not positive: measure more, longer steps")
        return cls(a / b, 1.0, c / b)


def balance_ratio(rank_costs: Sequence[float]) -> float:
    """max / mean of the ranks' costs for one step (1.0 is perfect; the slowest rank sets the pace)."""
    mean = sum(rank_costs) / len(rank_costs)
    return max(rank_costs) / mean if mean > 0 else 1.0


__all__ = ["CostModel", "balance_ratio"]
