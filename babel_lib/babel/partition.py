"""Partition an FFN's neurons into equal-size experts: balanced k-means, random, contiguous, co-activation.

Every method follows one size convention: with n = q*k + r neurons and k experts, experts 0..r-1 hold q+1
neurons and experts r..k-1 hold q, so a stable argsort of the labels lays the experts out contiguously.
"""

import math
import numbers

import torch
from torch import Tensor

from babel_lib.errors import BabelError

PARTITION_METHODS = ("kmeans", "random", "contiguous", "coactivation")

# Balanced assignment (see balanced_assignment): epsilon falls geometrically from EPS_START to EPS_END (in units
# of the score spread), about EPS_FACTOR per phase; an early phase stops bidding once at most TAIL of the points
# are free, the last one when its last STALL_ROUNDS rounds placed fewer than STALL_POINTS points; MAX_ROUNDS
# caps the rounds of one assignment; the shortest-path search checks for convergence every SWEEPS_PER_CHECK
# Bellman-Ford sweeps (each check waits for the device). Lloyd (see balanced_kmeans): HARTIGAN damps the leave-one-out
# correction; a run stops after PATIENCE iterations without a relative gain of TOL. Tuned on benchmarks/kmeans.py.
EPS_START = 0.1
EPS_END = 1e-4
EPS_FACTOR = 8.0
TAIL = 1 / 64
STALL_ROUNDS = 4
STALL_POINTS = 2
MAX_ROUNDS = 2000
SWEEPS_PER_CHECK = 4
HARTIGAN = 0.75
PATIENCE = 3
TOL = 1e-5
# Exchange refinement (see _refine_by_swaps): each cluster looks for swaps with its SWAP_NEIGHBOURS nearest
# clusters (by centre); a swap must gain more than SWAP_TOL times the mean squared row norm (float32 noise).
SWAP_NEIGHBOURS = 16
SWAP_TOL = 1e-5
SWAP_ROUNDS = 10000
# Seedings when balanced_kmeans is not told (restarts=None): as many as fit RESTART_BUDGET point-cluster pairs
# (n * k), between 1 and MAX_RESTARTS. Restarts escape a seeding that leaves too few centres in a popular cluster
# (one refined seeding ended up to 8.9% above k-means-constrained on small uneven mixtures, the best of four 0.5%);
# there they cost milliseconds, while an FFN layer (n * k = 393k-524k for the embedded models, 2.8M at 7B) gets one.
RESTART_BUDGET = 200_000
MAX_RESTARTS = 10


def default_restarts(n: int, k: int) -> int:
    """Seedings balanced_kmeans runs when not told: RESTART_BUDGET // (n * k), clamped to [1, MAX_RESTARTS]."""
    return max(1, min(MAX_RESTARTS, RESTART_BUDGET // (n * k)))


def expert_sizes(n: int, k: int) -> Tensor:
    """Sizes of the k experts for n neurons: q+1 for the first r experts and q for the rest (n = q*k + r)."""
    q, r = divmod(n, k)
    return torch.tensor([q + 1] * r + [q] * (k - r), dtype=torch.long)


def _contiguous(n: int, k: int, device: torch.device) -> Tensor:
    """Labels with neuron i in expert i // size (under the size convention when k does not divide n)."""
    return torch.repeat_interleave(torch.arange(k, device=device), expert_sizes(n, k).to(device))


def _rank_within(groups: Tensor, keys: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort by group, then key descending (stable): return the order, each sorted element's rank in its
    group, and the group start offsets in the sorted order."""
    order = keys.argsort(descending=True, stable=True)
    order = order[groups[order].argsort(stable=True)]
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(order.numel(), device=groups.device) - starts[sorted_groups]
    return order, rank, starts


def _keep_best_bids(owner: Tensor, bid: Tensor, caps: Tensor, prices: Tensor) -> Tensor:
    """Each cluster keeps its caps[j] highest bidders and frees the rest (in place on owner); returns the
    new prices: a full cluster's price is its lowest kept bid."""
    held = (owner >= 0).nonzero().squeeze(1)
    groups, bids = owner[held], bid[held]
    order, rank, starts = _rank_within(groups, bids, caps.numel())
    owner[held[order[rank >= caps[groups[order]]]]] = -1
    full = torch.bincount(groups, minlength=caps.numel()) >= caps
    lowest_kept = bids[order][(starts + caps - 1).clamp(max=held.numel() - 1)]
    return torch.where(full, lowest_kept, prices)


def _exchange_costs(scores: Tensor, owner: Tensor, clusters: Tensor) -> Tensor:
    """Rows of the exchange graph for the given clusters: [len(clusters), k], entry (a, b) the least score a
    point of a loses by moving to b (inf where a has no points, and on the diagonal)."""
    k = scores.shape[1]
    slot = torch.full((k,), -1, dtype=torch.long, device=scores.device)
    slot[clusters] = torch.arange(clusters.numel(), device=scores.device)
    members = (slot[owner.clamp_min(0)] >= 0).logical_and_(owner >= 0).nonzero().squeeze(1)
    home = owner[members]
    loss = scores[members, home][:, None] - scores[members]
    index = (slot[home][:, None] * k + torch.arange(k, device=scores.device)).view(-1)
    rows = torch.full((clusters.numel() * k,), torch.inf, dtype=scores.dtype, device=scores.device)
    rows = rows.scatter_reduce(0, index, loss.view(-1), "amin").view(-1, k)
    rows[torch.arange(clusters.numel(), device=scores.device), clusters] = torch.inf
    return rows


def _shortest_insertions(scores: Tensor, owner: Tensor, caps: Tensor, prices: Tensor) -> None:
    """Place the free points by successive shortest paths (in place on owner): each step inserts the free
    point and moves the chain of points (entering a0, a point of a0 moving to a1, ... up to a cluster with
    spare room) that lose the least total score. Edge a->b of the k-node exchange graph costs the least
    reduced value a point of a loses by moving to b; the prices act as potentials, updated after each path,
    that keep these costs non-negative (clamped at 0 where an eps-optimal auction left them slightly
    negative), so a Bellman-Ford sweep over the k x k matrix converges within the path length. Per
    insertion: O(k^2) per sweep plus O(k * cluster size) per cluster on the path (only those rows of the
    exchange graph change), after one O(n*k) pass."""
    k = scores.shape[1]
    base = _exchange_costs(scores, owner, torch.arange(k, device=scores.device))
    while True:
        free = (owner < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return
        edges = (base - prices[:, None] + prices).clamp_min(0)
        gain, entrant = (scores[free] - prices).max(0)
        dist = -gain
        pred = torch.full((k,), -1, dtype=torch.long, device=scores.device)
        for _ in range(0, k, SWEEPS_PER_CHECK):
            before = dist
            for _ in range(SWEEPS_PER_CHECK):
                via, arg = (dist[:, None] + edges).min(0)
                better = via < dist
                dist, pred = torch.where(better, via, dist), torch.where(better, arg, pred)
            if torch.equal(dist, before):
                break
        spare = caps - torch.bincount(owner[owner >= 0], minlength=k)
        sink = (dist - prices).masked_fill(spare <= 0, torch.inf).argmin()
        path, hops = [int(sink)], pred.tolist()
        while hops[path[-1]] >= 0:
            path.append(hops[path[-1]])
        changed = torch.tensor(path, device=scores.device)
        if len(path) > 1:  # every cluster a on the path hands its cheapest point to the next one, b, at once
            target = torch.full((k,), -1, dtype=torch.long, device=scores.device)
            target[changed[1:]] = changed[:-1]
            movers = (target[owner.clamp_min(0)] >= 0).logical_and_(owner >= 0).nonzero().squeeze(1)
            home = owner[movers]
            loss = scores[movers, home] - scores[movers, target[home]]
            least = torch.full((k,), torch.inf, dtype=loss.dtype, device=scores.device).scatter_reduce(
                0, home, loss, "amin")
            tied = movers.masked_fill(loss != least[home], owner.numel())
            first = torch.full((k,), owner.numel(), dtype=torch.long, device=scores.device).scatter_reduce(
                0, home, tied, "amin")[changed[1:]]
            owner[first] = target[owner[first]]
        owner[free[entrant[path[-1]]]] = path[-1]
        prices -= torch.minimum(dist, dist[sink])
        base[changed] = _exchange_costs(scores, owner, changed)


def _eps_schedule(spread: float) -> list[float]:
    """Geometric epsilon phases from EPS_START*spread down to EPS_END*spread, about EPS_FACTOR apart."""
    phases = max(1, round(math.log(EPS_START / EPS_END) / math.log(EPS_FACTOR)))
    return [spread * EPS_START * (EPS_END / EPS_START) ** (i / phases) for i in range(phases + 1)]


def balanced_assignment(scores: Tensor, caps: Tensor, max_rounds: int = MAX_ROUNDS) -> Tensor:
    """Assign each of n points to one of k clusters, cluster j taking exactly caps[j] points, maximising the
    total score: a Jacobi auction for the transportation problem with epsilon scaling, finished by
    successive shortest paths.

    Free points bid for their best cluster by the gap between their best and second-best value
    (score - price) plus eps, all in parallel; a cluster keeps its caps[j] highest bids and its price rises
    to the lowest kept bid once full. Each phase restarts the bidding at a smaller eps (from EPS_START to
    EPS_END times the score spread) from the current prices; the early phases only set prices, so they stop
    once at most TAIL of the points are free. The bulk of the points settles in a few rounds, but the last
    ones form long chains of single displacements (one round each), so the last phase stops bidding when it
    stalls (or at max_rounds) and the points still free are inserted by successive shortest paths, exactly.
    Each row is first shifted to a maximum of 0 (the optimum does not change, and every eps stays resolvable
    in float32) and a fixed jitter below eps[-1] / 2 breaks exact ties, which would otherwise send tied
    points to the same cluster round after round. Sizes are always exact and the total score is optimal up
    to about 1.5*n*eps[-1]. Per round: O(u*k) for u bidders plus an O(n log n) sort; per inserted point:
    O(k^2) per Bellman-Ford sweep. Returns labels [n]; caps must sum to n.
    """
    n, k = scores.shape
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=scores.device)
    scores = scores - scores.max(1, keepdim=True).values
    eps = _eps_schedule(float(-scores.min()) or 1.0)
    gen = torch.Generator(device=scores.device).manual_seed(0)
    jitter = torch.rand(scores.shape, generator=gen, device=scores.device, dtype=scores.dtype)
    scores = scores + jitter * (eps[-1] / 2)
    prices = torch.zeros(k, dtype=scores.dtype, device=scores.device)
    owner = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    bid = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    rounds = 0
    for phase, phase_eps in enumerate(eps):
        if rounds >= max_rounds:
            break
        owner.fill_(-1)
        last = phase == len(eps) - 1
        enough = 0 if last else n * TAIL
        history = [math.inf] * STALL_ROUNDS
        while rounds < max_rounds:
            free = (owner < 0).nonzero().squeeze(1)
            history.append(free.numel())
            if free.numel() <= enough or (last and history[-1 - STALL_ROUNDS] - free.numel() < STALL_POINTS):
                break
            rounds += 1
            top = (scores[free] - prices).topk(2, dim=1)
            target = top.indices[:, 0]
            owner[free] = target
            bid[free] = prices[target] + (top.values[:, 0] - top.values[:, 1]) + phase_eps
            prices = _keep_best_bids(owner, bid, caps, prices)
    if rounds >= max_rounds:  # bids may come from a coarser phase: free the points not eps[-1]-happy
        value = scores - prices
        owner[value.max(1).values - value.gather(1, owner.clamp_min(0)[:, None]).squeeze(1) > eps[-1]] = -1
    _shortest_insertions(scores, owner, caps, prices)
    return owner


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per centre, keeping the one that lowers the potential
    most): k steps of O(n*d*log k)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    sq = (x * x).sum(1)
    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centres = [x[first]]
    closest = (sq - 2 * (x @ x[first].T).squeeze(1) + sq[first]).clamp_min(0)
    for _ in range(1, k):
        weights = closest + 1e-12 * (closest.sum() == 0)
        cand = torch.multinomial(weights, trials, replacement=True, generator=gen)
        dist = torch.minimum((sq[:, None] - 2 * (x @ x[cand].T) + sq[cand]).clamp_min(0), closest[:, None])
        best = dist.sum(0).argmin()
        closest = dist[:, best]
        centres.append(x[cand[best]][None])
    return torch.cat(centres)


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per-cluster row sums for a labelling that follows the size convention: sort, then reshape (deterministic)."""
    n, d = x.shape
    q, r = divmod(n, k)
    xs = x[labels.argsort(stable=True)]
    split = r * (q + 1)
    return torch.cat([xs[:split].view(r, q + 1, d).sum(1), xs[split:].view(k - r, q, d).sum(1)])


def check_n_experts(k: object) -> None:
    """Raise BabelError unless k is a whole number >= 1 (a string such as "64" is refused, not converted)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise BabelError(f"n_experts must be an integer, got {k!r} ({type(k).__name__}); pass e.g. n_experts=64")
    if k < 1:
        raise BabelError(f"n_experts={k} must be at least 1; choose a positive number of experts")


def _check_rows(x: Tensor, k: int, what: str) -> None:
    """Raise BabelError unless x is a finite 2-D float matrix with at least k rows and k >= 1."""
    if x.ndim != 2 or not x.is_floating_point():
        raise BabelError(f"{what} must be a 2-D float tensor [n, d], got shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}; pass one row per neuron")
    if not bool(torch.isfinite(x).all()):
        raise BabelError(f"{what} contains NaN or inf; clean the rows (e.g. torch.nan_to_num) before partitioning")
    check_n_experts(k)
    if k > x.shape[0]:
        raise BabelError(f"n_experts={k} is larger than the FFN width {x.shape[0]}; choose at most {x.shape[0]}")


def _slots(labels: Tensor, caps: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster members as a padded [k, max size] table of row indices (0 in padding) and its validity mask."""
    k, width = caps.numel(), int(caps.max())
    order = labels.argsort(stable=True)
    sorted_labels = labels[order]
    rank = torch.arange(labels.numel(), device=labels.device) - (caps.cumsum(0) - caps)[sorted_labels]
    table = torch.zeros(k, width, dtype=torch.long, device=labels.device)
    table[sorted_labels, rank] = order
    return table, torch.arange(width, device=labels.device) < caps[:, None]


def _refine_by_swaps(x: Tensor, labels: Tensor, caps: Tensor, gram: Tensor) -> Tensor:
    """Improve a balanced labelling by exchanging pairs of points between clusters until no exchange lowers
    the inertia; sizes never change and every accepted exchange lowers the inertia.

    Exchanging a in cluster p with b in cluster q (means m, sizes c) raises the fit sum_j ||S_j||^2 / c_j by
    2 (b - a).(m_p - m_q) + ||a - b||^2 (1/c_p + 1/c_q), exactly. Each round scores every exchange between
    each cluster and its SWAP_NEIGHBOURS nearest clusters (gram = x x^T gives ||a - b||^2), each cluster picks
    its best partner, and mutual best pairs exchange their best pair of points, all at once (disjoint pairs
    of clusters, so the gains add). Escapes the local optima of Lloyd's step, where no single point can move
    without breaking the sizes. Per round: an O(n*k*d) matmul and O(n * SWAP_NEIGHBOURS * max size) scores.
    """
    k = caps.numel()
    arange = torch.arange(k, device=x.device)
    self_dots = gram.diagonal()
    tol = SWAP_TOL * float(self_dots.mean())
    width = 1 / caps.to(x.dtype)
    for _ in range(SWAP_ROUNDS):
        table, valid = _slots(labels, caps)
        centres = _cluster_sums(x, labels, k) / caps[:, None]
        dots = x @ centres.T
        lift = dots - dots.gather(1, labels[:, None])  # lift[i, q]: first-order gain of moving i to cluster q
        near = (centres @ centres.T).fill_diagonal_(-math.inf).topk(min(SWAP_NEIGHBOURS, k - 1), dim=1).indices
        mine, theirs = table[:, None, :, None], table[near][:, :, None, :]  # [k, L, w, 1] and [k, L, 1, w]
        gain = 2 * (lift[mine, near[:, :, None, None]] + lift[theirs, arange[:, None, None, None]]) + (
            (width[:, None] + width[near])[:, :, None, None]
            * (self_dots[mine] + self_dots[theirs] - 2 * gram[mine, theirs]))
        gain = gain.masked_fill(~(valid[:, None, :, None] & valid[near][:, :, None, :]), -math.inf)
        best, where = gain.flatten(2).max(2)
        a = table.gather(1, torch.div(where, table.shape[1], rounding_mode="floor"))
        b = theirs.squeeze(2).gather(2, (where % table.shape[1])[:, :, None]).squeeze(2)
        pair_gain = torch.full((k, k), -math.inf, dtype=x.dtype, device=x.device)
        pair_gain[arange[:, None], near] = best
        point_in_p = torch.zeros(k, k, dtype=torch.long, device=x.device)
        point_in_q = torch.zeros_like(point_in_p)
        point_in_p[arange[:, None], near], point_in_q[arange[:, None], near] = a, b
        forward = pair_gain >= pair_gain.T
        pair_gain = torch.maximum(pair_gain, pair_gain.T)
        point_in_p, point_in_q = (torch.where(forward, point_in_p, point_in_q.T),
                                  torch.where(forward, point_in_q, point_in_p.T))
        gain_p, partner = pair_gain.max(1)
        chosen = (partner[partner] == arange) & (arange < partner) & (gain_p > tol)
        if not bool(chosen.any()):
            break
        p, q = chosen.nonzero().squeeze(1), partner[chosen]
        i, j = point_in_p[p, q], point_in_q[p, q]
        labels = labels.clone()
        labels[i], labels[j] = q, p
    return labels


def _lloyd(x: Tensor, caps: Tensor, iters: int, gen: torch.Generator, gram: Tensor | None) -> tuple[Tensor, float]:
    """One balanced k-means run on prepared float32 rows: k-means++ seeding, then up to iters exact balanced
    assignments and mean updates, then (given the Gram matrix) exchange refinement. Returns the best labelling
    seen and its fit sum_j ||S_j||^2 / |C_j|."""
    n, k = x.shape[0], caps.numel()
    self_dots = (x * x).sum(1)
    rows = torch.arange(n, device=x.device)
    centres = _kmeans_pp(x, k, gen)
    best_labels, best_fit, labels, stale = None, -math.inf, None, 0
    for _ in range(iters):
        scores = x @ centres.T
        if labels is not None:
            scores[rows, labels] -= HARTIGAN * self_dots / caps[labels]
        new_labels = balanced_assignment(scores, caps)
        sums = _cluster_sums(x, new_labels, k)
        fit = float(((sums.double() ** 2).sum(1) / caps).sum())
        stale = 0 if fit > best_fit * (1 + TOL) else stale + 1
        if fit > best_fit:
            best_labels, best_fit = new_labels, fit
        if stale >= PATIENCE or (labels is not None and torch.equal(new_labels, labels)):
            break
        labels, centres = new_labels, sums / caps[:, None]
    if gram is not None:
        best_labels = _refine_by_swaps(x, best_labels, caps, gram)
    return best_labels, float(((_cluster_sums(x, best_labels, k).double() ** 2).sum(1) / caps).sum())


def balanced_kmeans(x: Tensor, k: int, *, iters: int = 30, seed: int = 0, normalize: bool = True,
                    restarts: int | None = None, swaps: bool = True) -> Tensor:
    """Exactly balanced k-means: labels [n] with clusters 0..r-1 of size q+1 and r..k-1 of size q (n = q*k + r).

    Minimises the k-means inertia sum_i ||x_i - m_{l(i)}||^2 (m_j the mean of cluster j) under exact sizes.
    With normalize=True the rows are L2-normalised first (MoEfication / LLaMA-MoE), so points lie on the unit
    sphere and, sizes being fixed, the inertia equals n - k - sum_j (|C_j| - 1) * cohesion_j: minimising it
    maximises the mean within-cluster cosine similarity (spherical clustering by cosine).

    Greedy k-means++ seeding, then Lloyd iterations whose assignment step solves the capacity-constrained
    assignment exactly (balanced_assignment: auction + shortest paths). With fixed sizes the ||m_j||^2 terms
    are constant, so the assignment maximises sum_i x_i . m_{l(i)}. A point's score for its own cluster
    leaves out HARTIGAN (0.75) of its own contribution to the mean: Lloyd's step favours staying put because
    a point pulls its own mean, and removing that bias (as Hartigan's method does) reaches clearly better
    optima in high dimension; the full correction overshoots when many points move at once. With swaps, each
    run ends with exchange refinement (_refine_by_swaps: pairs of points trade clusters while that lowers the
    inertia), which escapes the optima a poor seeding leaves on data with clusters of uneven popularity; it
    costs an n x n Gram matrix. swaps=False is the plain algorithm (for comparison). Per iteration:
    one O(n*k*d) matmul, the assignment and an O(n*d) mean update; the seeding is k steps of O(n*d*log k).
    A run stops early when its labels stop changing or its fit has not improved for PATIENCE iterations,
    and returns the best labelling it saw; restarts > 1 keeps the best of independent seedings (None: as many as
    default_restarts allows, one on an FFN layer). All-zero rows
    fill whole experts at the end of the label range (as many as they can fill; the rest are clustered).
    Computes in float32 on x's device; deterministic for a seed on CPU.
    """
    _check_rows(x, k, "x")
    if iters < 1 or (restarts is not None and restarts < 1):
        raise BabelError(f"iters={iters} and restarts={restarts} must be at least 1; use the defaults 30 and None "
                         "(restarts by problem size)")
    x = x.float()
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    n, sizes = x.shape[0], expert_sizes(x.shape[0], k).to(x.device)
    # All-zero rows (never-active neurons) are identical points: whole experts of them have zero inertia, and
    # left in the auction they would all bid for the same cluster round after round.
    zero = (x == 0).all(1).nonzero().squeeze(1)
    from_end = sizes.flip(0).cumsum(0)
    whole = min(int((from_end <= zero.numel()).sum()), k - 1)
    if whole == 0:
        return _best_run(x, k, iters, restarts, seed, swaps)
    zero = zero[: int(from_end[whole - 1])]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    labels[zero] = torch.repeat_interleave(torch.arange(k - whole, k, device=x.device), sizes[k - whole:])
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[zero] = False
    rest = rest.nonzero().squeeze(1)
    labels[rest] = _best_run(x[rest], k - whole, iters, restarts, seed, swaps)
    return labels


def _best_run(x: Tensor, k: int, iters: int, restarts: int | None, seed: int, swaps: bool) -> Tensor:
    """Labels of the best of restarts (None: default_restarts) balanced k-means runs on prepared float32 rows
    (each refined by exchanges when swaps)."""
    n = x.shape[0]
    if k in (1, n):
        return _contiguous(n, k, x.device)
    restarts = restarts or default_restarts(n, k)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    caps = expert_sizes(n, k).to(x.device)
    gram = x @ x.T if swaps else None
    runs = [_lloyd(x, caps, iters, gen, gram) for _ in range(restarts)]
    return max(runs, key=lambda run: run[1])[0]


def partition_labels(rows: Tensor, n_experts: int, method: str = "kmeans", *, seed: int = 0,
                     iters: int = 30, restarts: int | None = None) -> Tensor:
    """Expert label [n] for each of the n neurons, by method: "kmeans" (balanced k-means on the normalised
    rows: gate rows for gated FFNs, input rows otherwise), "coactivation" (the same on per-neuron activation
    features [n, n_features]), "random" (seeded shuffle) or "contiguous" (neuron i -> expert i // size);
    iters and restarts apply to the two k-means methods."""
    if method not in PARTITION_METHODS:
        raise BabelError(f"unknown partition method {method!r}; choose one of {', '.join(PARTITION_METHODS)}")
    _check_rows(rows, n_experts, "rows")
    n = rows.shape[0]
    if method in ("kmeans", "coactivation"):
        return balanced_kmeans(rows, n_experts, iters=iters, seed=seed, normalize=True, restarts=restarts)
    labels = _contiguous(n, n_experts, torch.device("cpu"))
    if method == "random":
        labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return labels.to(rows.device)


def _check_labels(rows: Tensor, labels: Tensor) -> None:
    """Raise BabelError unless labels is a 1-D integer tensor of non-negative labels, one per row."""
    if labels.ndim != 1 or labels.is_floating_point() or labels.numel() != rows.shape[0]:
        raise BabelError(f"labels must be a 1-D integer tensor with one entry per row ({rows.shape[0]}), got "
                         f"shape {tuple(labels.shape)} and dtype {labels.dtype}; pass partition_labels' output")
    if labels.numel() and int(labels.min()) < 0:
        raise BabelError("labels must be non-negative expert indices; pass partition_labels' output")


def _group_sums(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-label row sums [k, d] and counts [k] in float64, for any labelling."""
    labels = labels.to(x.device).long()
    k = int(labels.max()) + 1
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, x.double())
    return sums, torch.bincount(labels, minlength=k).double()


def cohesion(rows: Tensor, labels: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of the rows within each expert (self-pairs excluded), [k] float64;
    NaN for an expert with fewer than two rows. O(n*d): the pairwise dots of unit rows sum to
    ||sum of rows||^2 - sum of ||row||^2."""
    _check_labels(rows, labels)
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    sums, counts = _group_sums(unit, labels)
    self_dots = torch.zeros_like(counts).index_add_(0, labels.to(unit.device).long(), (unit * unit).sum(1))
    pairs = counts * (counts - 1)
    return torch.where(pairs > 0, ((sums * sums).sum(1) - self_dots) / pairs.clamp_min(1), torch.nan)


def inertia(x: Tensor, labels: Tensor, normalize: bool = True) -> float:
    """The k-means objective: sum of squared distances of the (L2-normalised when normalize) rows to their
    cluster mean, computed as sum ||x_i||^2 - sum_j ||S_j||^2 / |C_j| in float64."""
    _check_labels(x, labels)
    x = x.double()
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    sums, counts = _group_sums(x, labels)
    nonempty = counts > 0
    return float((x * x).sum() - ((sums[nonempty] ** 2).sum(1) / counts[nonempty]).sum())
