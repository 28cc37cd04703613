"""What a request counts against an allowance and what it costs: the catalog model's multipliers and
prices applied to the tokens a provider reports. The one definition, used by the gateway on every
request, by the usage ingest for every event and by the catalog."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from decimal import Decimal

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Pricing:
    multipliers: tuple[Decimal, Decimal, Decimal]  # input, output, cached input
    prices: tuple[Decimal, Decimal, Decimal]  # per million tokens, in the organization's currency

    def weighted(self, input_tokens: int, output_tokens: int = 0, cached_tokens: int = 0) -> int:
        """The tokens counted against the allowance: the multiplied sum, rounded up to a whole token."""
        (m_in, m_out, m_cached), denominator = self._integer_multipliers
        return -(-(input_tokens * m_in + output_tokens * m_out + cached_tokens * m_cached) // denominator)

    @functools.cached_property
    def _integer_multipliers(self) -> tuple[tuple[int, int, int], int]:
        # The multipliers as whole numbers over one denominator: exact like Decimal arithmetic, at a
        # fraction of its cost (a usage batch prices 1,000 events).
        ratios = [multiplier.as_integer_ratio() for multiplier in self.multipliers]
        denominator = math.lcm(*(d for _, d in ratios))
        return tuple(n * (denominator // d) for n, d in ratios), denominator

    def cost(self, input_tokens: int, output_tokens: int = 0, cached_tokens: int = 0) -> Decimal:
        p_in, p_out, p_cached = self.prices
        return (input_tokens * p_in + output_tokens * p_out + cached_tokens * p_cached) / MILLION

    def allowance_cost(self, tokens: int) -> tuple[Decimal, Decimal]:
        """What `tokens` counted against the allowance cost at these prices, spent all on input
        tokens and all on output tokens: the two ends of what a mix of them costs."""
        (m_in, m_out, _), (p_in, p_out, _) = self.multipliers, self.prices
        return tuple(sorted((Decimal(tokens) / m_in * p_in / MILLION, Decimal(tokens) / m_out * p_out / MILLION)))

    def billable_cost(self, tokens: int) -> Decimal:
        """What `tokens` of billable overage (counted against the allowance) are charged: the
        lower end of allowance_cost, as if all were input tokens. The ledger keeps counted tokens,
        not their input/output mix, so the charge is never more than what they can have cost."""
        return self.allowance_cost(tokens)[0]
