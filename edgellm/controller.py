"""How many tokens to propose each round, and from which source: the speculative loop's cost model.

Pure bookkeeping over measured acceptance and measured costs; :mod:`edgellm.speculative` asks it
for gamma (:meth:`DraftLengthController.choose_gamma`) and reports each round (``observe``).
"""

from __future__ import annotations

FIXED_DRAFT_COST = 0.3  # a draft token's cost in one-row target passes, when costs are not measured


class DraftLengthController:
    """Chooses gamma, and the source of proposals, from measured acceptance and measured costs.

    Expected tokens of a round with gamma proposals: ``E(g) = 1 + sum_{i<=g} S(i)``, where
    ``S(i)`` is the measured chance that the first i proposals are all accepted (a product of
    per-position rejection rates, estimated from recent rounds and shrunk towards the pooled
    rate). Acceptance comes in runs — a draft that got the first tokens right tends to get the
    next ones right — which a single per-token rate ``a`` (``E = (1 - a**(g+1)) / (1 - a)``)
    underestimates. The cost is ``g * t_draft + t_verify(g + 1)`` (lookup proposals cost
    nothing). The controller picks the g (0 = plain target step) with the most tokens per second,
    and probes g = 1 now and then after backing off so that a changed acceptance is noticed.
    Everything is tracked per source (``draft``, ``lookup``).

    With ``clock=False`` the costs are not measured but fixed (a draft token costs
    :data:`FIXED_DRAFT_COST` of a one-row target pass, each verified row 10 % more), so that the
    choices depend on the request's tokens alone: a seeded sampled request, whose samples follow
    its proposals, then gives the same text on every run.
    """

    def __init__(self, max_gamma: int, prior_acceptance: float = 0.7, max_lookup: int | None = None,
                 clock: bool = True) -> None:
        self.max_gamma = max_gamma
        self.clock = clock
        self.max_lookup = max_gamma if max_lookup is None else max_lookup
        # pseudo-counts; lookup starts optimistic so that it gets tried (it is free) and learns fast
        # (``shared``: proposals from other requests' text, :class:`edgellm.lookup.SharedLookup`)
        self.counts = {"draft": [4.0 * prior_acceptance, 4.0], "lookup": [2.0 * 0.8, 2.0], "shared": [2.0 * 0.8, 2.0]}
        # per source, per proposal position i (1-based): [rejected at i, reached i], decayed
        self.positions: dict[str, dict[int, list[float]]] = {"draft": {}, "lookup": {}, "shared": {}}
        self.t_draft: float | None = None if clock else FIXED_DRAFT_COST
        self.t_verify: dict[int, float] = {}
        self.rounds_since_probe = 0

    def alpha(self, source: str = "draft") -> float:
        acc, trials = self.counts[source]
        return min(acc / trials, 0.999)

    def observe(self, gamma: int, accepted: int, draft_step_s: float | None, verify_s: float,
                source: str = "draft") -> None:
        """Record a round. ``draft_step_s``: draft seconds per proposed token (catch-up excluded)."""
        decay = 0.9
        if gamma:
            c = self.counts[source]
            c[0] = decay * c[0] + accepted
            c[1] = decay * c[1] + accepted + (accepted < gamma)
            pos = self.positions[source]
            for counts in pos.values():
                counts[0] *= decay
                counts[1] *= decay
            for i in range(1, min(gamma, accepted + 1) + 1):
                counts = pos.setdefault(i, [0.0, 0.0])
                counts[0] += i == accepted + 1
                counts[1] += 1
        if not self.clock:
            return
        if draft_step_s is not None:
            self.t_draft = draft_step_s if self.t_draft is None else 0.8 * self.t_draft + 0.2 * draft_step_s
        k = gamma + 1
        old = self.t_verify.get(k)
        self.t_verify[k] = verify_s if old is None else 0.8 * old + 0.2 * verify_s

    def _verify_cost(self, k: int) -> float:
        if k in self.t_verify:
            return self.t_verify[k]
        known = sorted(self.t_verify)
        if not known:
            return 1.0 + 0.1 * (k - 1)
        lo = max([x for x in known if x < k], default=None)
        hi = min([x for x in known if x > k], default=None)
        if lo is not None and hi is not None:
            w = (k - lo) / (hi - lo)
            return (1 - w) * self.t_verify[lo] + w * self.t_verify[hi]
        ref = lo if lo is not None else hi  # extrapolate: ~10% of a step per token, either way
        return max(self.t_verify[ref] * (1 + 0.1 * (k - ref)), 0.2 * self.t_verify[ref])

    def expected_tokens(self, g: int, source: str = "draft") -> float:
        """``E(g)``: tokens a round with ``g`` proposals commits, on average (see the class doc)."""
        pooled = 1.0 - self.alpha(source)
        pos = self.positions[source]
        total = survive = 1.0
        for i in range(1, g + 1):
            rejected, reached = pos.get(i, (0.0, 0.0))
            survive *= 1.0 - (rejected + 2.0 * pooled) / (reached + 2.0)  # shrunk to the pooled rate
            total += survive
        return total

    def rate(self, g: int, source: str = "draft") -> float:
        """Expected tokens per second of a round with ``g`` proposals from ``source``."""
        td = (self.t_draft or 0.0) if source == "draft" else 0.0
        return self.expected_tokens(g, source) / (g * td + self._verify_cost(g + 1))

    def choose_gamma(self, limit: int, source: str = "draft") -> int:
        """How many proposals (at most ``limit``) a round should take from ``source``: the count
        with the most expected tokens per second (0: a plain target step)."""
        limit = min(limit, self.max_gamma if source == "draft" else self.max_lookup)
        if limit <= 0:
            return 0
        if source == "draft" and self.t_draft is None:
            return min(limit, 4)  # nothing measured yet
        best = 0
        for g in range(1, limit + 1):
            if self.rate(g, source) > self.rate(best, source) * 1.02:  # a longer draft must pay clearly
                best = g
        if source != "draft":
            return best
        self.rounds_since_probe = self.rounds_since_probe + 1 if best == 0 else 0
        if best == 0 and self.rounds_since_probe >= 16:  # look again: acceptance may have changed
            self.rounds_since_probe = 0
            return 1
        return best
