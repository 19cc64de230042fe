"""The mixed-integer program: one (attention, FFN) pair per layer, least damage within budgets.

Built in the order data -> variables -> constraints -> objective, solved by HiGHS (highspy, or the
same bindings scipy ships). Variables z[l, p] are binary: layer l uses pair p. Constraints:
  exactly one pair per layer                      sum_p z[l, p] = 1
  resources (any of memory, time, latency, params) sum_{l,p} cost_r[l, p] z[l, p] <= budget_r - fixed_r
  diversity with each earlier solution s          sum_l z[l, s_l] <= floor((1 - diversity) * L)
Objective: minimize sum_{l,p} damage[l, p] z[l, p].

Speed (a Llama-405B-sized space: 126 layers x 144 pairs, 10 diverse solutions, well under 2 s):
the LP relaxation lives in one HiGHS instance for all solutions (each new one adds a row and
changes bounds, so dual simplex restarts from the last basis); dominance between pairs is
computed once; the MIPs HiGHS sees are small (the layers the LP left fractional) or start from
an incumbent with reduced-cost fixing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix

from ..errors import PuzzleError


@dataclass
class Problem:
    """Per layer, the candidate pairs: their names, damage and resource costs.

    options[l] = list of (attention name, ffn name); damage[l] and costs[r][l] are lists aligned with it.
    fixed[r] is the part of resource r every child pays (embeddings, LM head); budgets[r] the limit.
    """

    options: list[list[tuple[str, str]]]
    damage: list[list[float]]
    costs: dict[str, list[list[float]]]
    fixed: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.options)


@dataclass
class Solution:
    status: str  # "optimal" | "time_limit" (feasible, maybe not optimal)
    objective: float
    choice: list[int]  # index into options[l] per layer
    pairs: list[tuple[str, str]]
    resources: dict[str, float]
    solve_seconds: float


# Relative optimality tolerance, as HiGHS defines it: (incumbent - bound) / |incumbent|.
MIP_GAP = 1e-3


class Infeasible(PuzzleError):
    pass


def _highs():
    """(module, Highs class): highspy when installed, else the same bindings scipy >= 1.15 ships."""
    try:
        import highspy

        return highspy, highspy.Highs
    except ImportError:
        pass
    try:
        from scipy.optimize._highspy import _core
    except ImportError:
        raise PuzzleError("the search needs HiGHS's Python bindings: pip install highspy (or scipy>=1.15)") from None
    return _core, _core._Highs


class _Flat:
    """The problem as flat arrays over all (layer, pair) columns."""

    def __init__(self, problem: Problem, budgets: dict[str, float]):
        sizes = np.array([len(o) for o in problem.options])
        self.L = problem.num_layers
        self.start = np.concatenate([[0], np.cumsum(sizes)])  # layer l owns columns start[l]:start[l+1]
        self.n = int(self.start[-1])
        self.layer = np.repeat(np.arange(self.L), sizes)
        # HiGHS's feasibility tolerance is absolute (1e-7): in raw units a tiny model's time budget
        # (~1e-6 s) could be overrun unnoticed, so each resource row is scaled to a budget of 1
        scale = {r: abs(budgets[r]) if np.isfinite(budgets[r]) and budgets[r] != 0 else 1.0 for r in budgets}
        self.cost = {r: np.concatenate([np.asarray(c, dtype=float) for c in problem.costs[r]]) / scale[r] for r in budgets}
        self.cap = {r: (budgets[r] - problem.fixed.get(r, 0.0)) / scale[r] for r in budgets}
        # dominators[l][p, q]: pair p of layer l beats or ties q on damage and every constrained resource,
        # and comes first among equals. Computed once, for all layers of one size together: each solve
        # only changes which p may remove q.
        self.dominators: list[np.ndarray] = [None] * self.L  # type: ignore[list-item]
        for size in np.unique(sizes):
            layers = np.flatnonzero(sizes == size)
            vec = np.stack([np.column_stack([np.asarray(problem.damage[layer], dtype=float),
                                             *(np.asarray(problem.costs[r][layer], dtype=float) for r in budgets)])
                            for layer in layers])  # (layers, pairs, 1 + resources)
            rank = np.empty(vec.shape[:2], dtype=int)
            for i in range(len(layers)):
                rank[i, np.lexsort(vec[i].T[::-1])] = np.arange(size)
            dom = np.all(vec[:, :, None, :] <= vec[:, None, :, :], axis=-1) & (rank[:, :, None] < rank[:, None, :])
            for i, layer in enumerate(layers):
                self.dominators[layer] = dom[i]
        self.n_dominators = [d.sum(axis=0) for d in self.dominators]

    def allowed(self, taken: list[set[int]]) -> np.ndarray:
        """Columns that survive dominance pruning (see prune_dominated): q goes iff a dominator of q
        that no earlier solution chose in that layer exists."""
        keep = np.empty(self.n, dtype=bool)
        for layer in range(self.L):
            left = self.n_dominators[layer]
            if taken[layer]:
                left = left - self.dominators[layer][sorted(taken[layer])].sum(axis=0)
            keep[self.start[layer] : self.start[layer + 1]] = left == 0
        return keep


def _new_highs(time_limit: float):
    hs, Highs = _highs()
    h = Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(max(time_limit, 1e-3)))
    return hs, h


def _pass_model(hs, h, cost, upper, a, lower_rows, upper_rows, integer: bool, offset: float = 0.0) -> None:
    a = a.tocsc()
    lp = hs.HighsLp()
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = a.shape[1], a.shape[0]
    lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    lp.col_cost_ = np.asarray(cost, dtype=float)
    lp.offset_ = float(offset)
    lp.col_lower_, lp.col_upper_ = np.zeros(a.shape[1]), np.asarray(upper, dtype=float)
    lp.row_lower_, lp.row_upper_ = np.asarray(lower_rows, dtype=float), np.asarray(upper_rows, dtype=float)
    if integer:
        lp.integrality_ = [hs.HighsVarType.kInteger] * a.shape[1]
    h.passModel(lp)


def _base_rows(flat: _Flat, cols: np.ndarray):
    """Rows over the columns `cols`: one per layer they touch (= 1), then one per resource (<= cap).
    Returns (row, col, value) triplets, row bounds, and the layers in row order."""
    layers, row_of = np.unique(flat.layer[cols], return_inverse=True)
    k = np.arange(len(cols))
    rows, vals = [row_of], [np.ones(len(cols))]
    for i, r in enumerate(flat.cap):
        rows.append(np.full(len(cols), len(layers) + i))
        vals.append(flat.cost[r][cols])
    lo = [1.0] * len(layers) + [-np.inf] * len(flat.cap)
    hi = [1.0] * len(layers) + list(flat.cap.values())
    return [np.concatenate(rows), np.concatenate([k] * (1 + len(flat.cap))), np.concatenate(vals)], lo, hi, layers


class _Relaxation:
    """The LP relaxation, kept in one HiGHS instance for every solution of a run: a new solution
    adds one diversity row and changes column bounds, and dual simplex restarts from the last basis
    (hot start) instead of from scratch."""

    def __init__(self, flat: _Flat, objective: np.ndarray):
        self.flat = flat
        (r, c, v), lo, hi, _ = _base_rows(flat, np.arange(flat.n))
        a = coo_matrix((v, (r, c)), shape=(len(lo), flat.n))
        self.hs, self.h = _new_highs(60.0)
        _pass_model(self.hs, self.h, objective, np.ones(flat.n), a, lo, hi, integer=False)
        self.index = np.arange(flat.n, dtype=np.int32)

    def add_diversity_row(self, cols: np.ndarray, max_same: float) -> None:
        self.h.addRow(-np.inf, float(max_same), len(cols), cols.astype(np.int32), np.ones(len(cols)))

    def solve(self, upper: np.ndarray, time_limit: float):
        """(x, objective, reduced costs), or a status string when there is no usable optimum."""
        h = self.h
        h.changeColsBounds(self.flat.n, self.index, np.zeros(self.flat.n), upper.astype(float))
        h.setOptionValue("time_limit", float(h.getRunTime() + max(time_limit, 1e-3)))  # HiGHS's clock adds up over runs
        h.run()
        status = h.getModelStatus()
        if status == self.hs.HighsModelStatus.kOptimal:
            sol = h.getSolution()
            return np.array(sol.col_value), h.getInfo().objective_function_value, np.array(sol.col_dual)
        return "infeasible" if status == self.hs.HighsModelStatus.kInfeasible else "time_limit"


def _mip(flat: _Flat, objective: np.ndarray, cols: np.ndarray, fixed: np.ndarray, earlier: list[np.ndarray],
         max_same: int, time_limit: float, mip_gap: float, incumbent: np.ndarray | None = None):
    """The MIP over the columns `cols` (their layers free) with the columns `fixed` chosen in every
    other layer. Returns (chosen columns or None, status)."""
    if len(np.unique(flat.layer[cols])) + len(fixed) != flat.L:
        return None, "infeasible"  # a free layer with no column left
    (r, c, v), lo, hi, _ = _base_rows(flat, cols)
    n_base = len(lo)
    for i, res in enumerate(flat.cap):  # the fixed layers' share of each budget
        hi[n_base - len(flat.cap) + i] -= float(flat.cost[res][fixed].sum())
    rows, ks = [r], [c]
    for e in earlier:  # diversity: the fixed layers that repeat e count against the limit already
        same = np.flatnonzero(np.isin(cols, e))
        rows.append(np.full(len(same), len(lo)))
        ks.append(same)
        lo.append(-np.inf)
        hi.append(max_same - float(np.isin(fixed, e).sum()))
    vals = np.concatenate([v, np.ones(sum(len(k) for k in ks[1:]))])
    a = coo_matrix((vals, (np.concatenate(rows), np.concatenate(ks))), shape=(len(lo), len(cols)))
    hs, h = _new_highs(time_limit)
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    # the fixed layers' damage as the objective's offset: HiGHS's relative gap is then relative to the
    # whole child's damage, not to the few free layers' share (a far stricter, slower target)
    _pass_model(hs, h, objective[cols], np.ones(len(cols)), a, lo, hi, integer=True, offset=objective[fixed].sum())
    if incumbent is not None:  # a known feasible child: HiGHS only has to beat it or prove it within the gap
        start = np.isin(cols, incumbent).astype(float)
        sol = hs.HighsSolution()
        sol.col_value = start
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    status = h.getModelStatus()
    if status == hs.HighsModelStatus.kInfeasible:
        return None, "infeasible"
    if h.getInfo().primal_solution_status != 2:  # 2 = feasible: no child found in time
        return None, "time_limit"
    chosen = cols[np.array(h.getSolution().col_value) > 0.5]
    return np.sort(np.concatenate([chosen, fixed])), "optimal" if status == hs.HighsModelStatus.kOptimal else "time_limit"


class _Search:
    """One objective and set of budgets, solved repeatedly for diverse solutions."""

    def __init__(self, problem: Problem, objective: np.ndarray, budgets: dict[str, float]):
        self.flat = _Flat(problem, budgets)
        self.objective = objective
        self.relaxation = _Relaxation(self.flat, objective)
        self.earlier: list[np.ndarray] = []

    def add_earlier(self, cols: np.ndarray, max_same: int) -> None:
        self.earlier.append(cols)
        self.relaxation.add_diversity_row(cols, max_same)

    def solve(self, allowed: np.ndarray, max_same: int, time_limit: float, mip_gap: float):
        """(chosen columns or None, status).

        HiGHS alone spends most of its time on the diverse solutions finding a good incumbent, while
        the LP bound is already within 0.01 % of the optimum: near-tied damages leave many
        almost-equal children. So we hand it the easy part first:
          1. solve the LP relaxation (a bound, a guide and reduced costs);
          2. keep every layer the LP chose integrally, and solve the small MIP over the layers it left
             fractional (a relaxation-induced neighbourhood, usually a handful of layers), first with
             only their pairs of small reduced cost;
          3. if that incumbent is within `mip_gap` of the LP bound it is optimal to the same tolerance
             HiGHS itself uses, and we stop;
          4. otherwise HiGHS gets the whole model with that incumbent, shrunk by reduced-cost fixing
             (exact: a pair whose reduced cost exceeds incumbent - gap - bound cannot be in a child
             that beats the incumbent by more than the tolerance).
        """
        flat, obj = self.flat, self.objective
        start = time.perf_counter()
        left = lambda: max(time_limit - (time.perf_counter() - start), 1e-3)  # noqa: E731
        lp = self.relaxation.solve(allowed, time_limit)
        if lp == "infeasible":  # the relaxation is infeasible, so is the MIP
            return None, "infeasible"
        if isinstance(lp, str):  # no usable relaxation in time: HiGHS on the whole model
            return _mip(flat, obj, np.flatnonzero(allowed), np.empty(0, int), self.earlier, max_same, left(), mip_gap)
        x, bound, reduced = lp
        integral = np.zeros(flat.n, dtype=bool)
        integral[x > 1 - 1e-7] = True
        fixed_layers = np.zeros(flat.L, dtype=bool)
        fixed_layers[flat.layer[integral]] = True
        fixed = np.flatnonzero(integral & fixed_layers[flat.layer])
        incumbent = fixed if len(fixed) == flat.L else None
        # the neighbourhood's pairs: first only those whose reduced cost is within the tolerance (a
        # near-optimal child rarely uses others; tens of columns instead of hundreds), then all
        for limit in (mip_gap * max(abs(bound), 1e-12), np.inf):
            if incumbent is not None:
                break
            free = np.flatnonzero(allowed & ~fixed_layers[flat.layer] & (reduced <= limit + 1e-7))
            incumbent, _ = _mip(flat, obj, free, fixed, self.earlier, max_same, left(), mip_gap)
        if incumbent is not None:
            best = float(obj[incumbent].sum())
            if best - bound <= mip_gap * max(abs(best), 1e-12):
                return incumbent, "optimal"
            cutoff = best - mip_gap * abs(best)
            keep = allowed & (reduced <= cutoff - bound + 1e-7)
            keep[incumbent] = True
        else:
            keep = allowed
        found, status = _mip(flat, obj, np.flatnonzero(keep), np.empty(0, int), self.earlier, max_same, left(), mip_gap,
                             incumbent)
        if found is None and incumbent is not None:
            return incumbent, "time_limit" if status == "time_limit" else "optimal"
        return found, status


def _choice(flat: _Flat, cols: np.ndarray) -> list[int]:
    return (cols[np.argsort(flat.layer[cols])] - flat.start[:-1]).tolist()


def evaluate(problem: Problem, choice: list[int]) -> tuple[float, dict[str, float]]:
    damage = sum(problem.damage[layer][p] for layer, p in enumerate(choice))
    resources = {
        name: problem.fixed.get(name, 0.0) + sum(cost[layer][p] for layer, p in enumerate(choice))
        for name, cost in problem.costs.items()
    }
    return damage, resources


def _cheapest(problem: Problem, resource: str, other_budgets: dict[str, float], time_limit: float) -> float | None:
    obj = np.concatenate([np.asarray(c, dtype=float) for c in problem.costs[resource]])
    search = _Search(problem, obj, other_budgets)
    cols, _ = search.solve(np.ones(search.flat.n, dtype=bool), problem.num_layers, time_limit, MIP_GAP)
    if cols is None:
        return None
    return evaluate(problem, _choice(search.flat, cols))[1][resource]


def prune_dominated(problem: Problem, taken: list[set[int]] | None = None) -> tuple[Problem, list[list[int]]]:
    """Drop, per layer, every pair that another pair beats or ties on damage and on every
    constrained resource. HiGHS gets a smaller model (a Llama-70B-sized space shrinks severalfold).

    Exactness: swapping a dominated pair q for its dominator p never makes a child worse or break a
    budget, and it cannot break the diversity rule either unless p is what an earlier solution chose
    in that layer (`taken[l]`): so only a dominator outside `taken[l]` may remove q. Returns the
    reduced problem and, per layer, the original index of each kept pair. (solve() applies the same
    rule as column bounds, with the dominance relation computed once.)
    """
    flat = _Flat(problem, problem.budgets)
    keep = flat.allowed(taken or [set() for _ in range(problem.num_layers)])
    kept_all = [np.flatnonzero(keep[flat.start[layer] : flat.start[layer + 1]]).tolist() for layer in range(flat.L)]
    reduced = Problem(
        [[problem.options[layer][p] for p in kept] for layer, kept in enumerate(kept_all)],
        [[problem.damage[layer][p] for p in kept] for layer, kept in enumerate(kept_all)],
        {r: [[c[layer][p] for p in kept] for layer, kept in enumerate(kept_all)] for r, c in problem.costs.items()},
        dict(problem.fixed),
        dict(problem.budgets),
    )
    return reduced, kept_all


def solve(problem: Problem, solutions: int = 1, diversity: float = 0.2, time_limit: float = 60.0,
          describe=None, mip_gap: float = MIP_GAP) -> list[Solution]:
    """Up to `solutions` solutions, each differing from all earlier ones in >= diversity * L layers.

    Each is the least-damage child (within `mip_gap`) among those that meet every budget and differ
    enough from the earlier ones. Raises Infeasible (one line: which budget, and the cheapest
    reachable value under the others) when not even the first exists. `describe(resource, value)`
    formats a resource for messages. Dominated pairs are excluded before each solve (see
    prune_dominated).
    """
    describe = describe or (lambda r, v: f"{r}={v:.4g}")
    for name in problem.budgets:
        if name not in problem.costs:
            raise PuzzleError(f"budget on unknown resource {name!r} (known: {', '.join(problem.costs)})")
    objective = np.concatenate([np.asarray(d, dtype=float) for d in problem.damage])
    search = _Search(problem, objective, problem.budgets)
    max_same = math.floor((1 - diversity) * problem.num_layers + 1e-9)
    taken: list[set[int]] = [set() for _ in range(problem.num_layers)]
    found: list[Solution] = []
    for _ in range(solutions):
        t = time.perf_counter()
        cols, status = search.solve(search.flat.allowed(taken), max_same, time_limit, mip_gap)
        if cols is None:
            if found:
                break  # the diversity rule leaves no further solution: return what exists
            raise Infeasible(_infeasibility_message(problem, time_limit, describe))
        choice = _choice(search.flat, cols)
        damage, resources = evaluate(problem, choice)
        pairs = [problem.options[layer][p] for layer, p in enumerate(choice)]
        found.append(Solution(status, damage, choice, pairs, resources, time.perf_counter() - t))
        search.add_earlier(cols, max_same)
        for layer, p in enumerate(choice):
            taken[layer].add(p)
    return found


def _infeasibility_message(problem: Problem, time_limit: float, describe) -> str:
    parts = []
    for name, budget in problem.budgets.items():
        others = {k: v for k, v in problem.budgets.items() if k != name}
        best = _cheapest(problem, name, others, time_limit)
        if best is None:
            continue
        if best > budget + 1e-12:
            parts.append(f"{describe(name, budget)} is unreachable: the cheapest child under the other constraints "
                         f"has {describe(name, best)}")
    if not parts:
        parts.append("the budgets cannot all hold together: " + ", ".join(describe(k, v) for k, v in problem.budgets.items()))
    return "no architecture fits: " + "; ".join(parts)
