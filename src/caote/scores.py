"""Eviction scores as pure tensor functions: higher score = more worth keeping.

Shapes (one transformer layer, one forward step over ``Q`` new queries):

* ``attn``     ``(B, H_kv, G, Q, N)`` float32 attention weights of the step's queries over the ``N`` stored
  entries (new tokens included), query heads grouped by the KV head they share (``G = H_q / H_kv``).
* ``values``   ``(B, H_kv, N, D)`` float32 cached values.
* ``outputs``  ``(B, H_kv, G, Q, D)`` float32 per-head attention outputs ``X = Σ_i a_i v_i`` (before ``o_proj``).
* every score function returns ``(B, H_kv, N)``.

Every formula cites ``shared/docs/method.md`` (CAOTE, arXiv 2504.14051) or the reference code it follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-4
"""Smallest ``1 - a_j`` that is resolved (method.md §2: ``a_j -> 1`` sends the error to infinity). Below it the
float32 rounding of ``X`` (~6e-8 relative), multiplied by ``a/(1-a) > 1e4``, would exceed ~0.1% of the error:
such an entry scores infinite and is never evicted."""


def _error_ratio(weights: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``a / (1 - a)``: how much evicting an entry of weight ``a`` renormalises the others (method.md §2).

    Where ``1 - a < eps`` float32 cannot resolve the error any more (``a`` rounds to 1 and ``X`` to ``v_j``):
    the ratio is infinite, so the entry that carries all the attention is never evicted (method.md §2).
    """
    rest = 1.0 - weights
    return torch.where(rest < eps, torch.inf, weights / rest.clamp_min(eps))


def _times_ratio(ratio: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """``ratio · distance`` with an infinite ratio staying infinite (not ``inf · 0 = nan``)."""
    return torch.where(torch.isinf(ratio), torch.inf, ratio * distance)


DIRECT_ROWS = 4
"""Up to this many query rows per KV head (``G · Q``) :func:`caote_scores` computes every ``‖X − v_j‖`` directly:
the one row a ``+caote`` correction re-scores (method.md §3), or one decode query of a group of three. There the
``(G·Q) × N × D`` differences are small and the direct form is a few ops against the expanded form's ~20 (768
entries, D = 64, one thread: one row 101 µs against 402 µs, four 302 against 358; ``python
scripts/bench_caote_scores.py``, results/bench/caote_scores_direct_vs_expanded.md); at six rows the two are even,
from eight on the expanded form is faster, and it never materialises the differences."""


def caote_scores(attn: torch.Tensor, values: torch.Tensor, outputs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """CAOTE, exact (method.md §2, aggregated as in §4).

    Per query ``q`` and query head ``g``: ``c = a_j / (1 - a_j) · ‖X - v_j‖₂`` is the norm of the change of
    that head's output when entry ``j`` is evicted and attention renormalised. DECISION (method.md §4):
    the errors of all the step's queries and of the query heads sharing a KV head combine by root-sum-square,
    ``c_j = sqrt(Σ_{q,g} c_{q,g,j}²)``, the Frobenius norm of the KV head's whole output change.
    A query that cannot see ``j`` (causal mask, ``a = 0``) contributes 0.

    Up to :data:`DIRECT_ROWS` rows per KV head the distances are computed directly (:func:`_direct_caote_scores`);
    beyond, by an expansion that materialises no difference (:func:`_expanded_caote_scores`). Both are exact up to
    float32 rounding and agree (tested).
    """
    if attn.shape[2] * attn.shape[3] <= DIRECT_ROWS:
        return _direct_caote_scores(attn, values, outputs, eps)
    return _expanded_caote_scores(attn, values, outputs, eps)


def _direct_caote_scores(attn: torch.Tensor, values: torch.Tensor, outputs: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`caote_scores` from the ``(G·Q) × N`` distances ``‖X_q − v_j‖`` themselves (few rows)."""
    batch, heads, group, q_len, n = attn.shape
    rows = attn.reshape(batch, heads, group * q_len, n)
    differences = values.unsqueeze(2) - outputs.reshape(batch, heads, group * q_len, 1, -1)  # (B, H, G·Q, N, D)
    distance = torch.linalg.vector_norm(differences, dim=-1)
    errors = _times_ratio(_error_ratio(rows, eps), distance)
    return errors.square().sum(2).sqrt()  # (vector_norm over a middle dimension is ~30x slower here)


def _expanded_caote_scores(attn: torch.Tensor, values: torch.Tensor, outputs: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`caote_scores` without materialising any ``(G·Q) × N × D`` difference: with ``r = (a/(1-a))²``,
    ``Σ r ‖X - v_j‖² = Σ r ‖X‖² - 2 (Σ r X)·v_j + ‖v_j‖² Σ r`` (one matmul). That expansion cancels
    catastrophically when ``X ≈ v_j``: the pairs with ``a > 1/2`` (at most one per query row, and the ones
    whose large ratio would amplify the error) are computed as direct differences, and so is every entry whose
    expanded sum comes out below 1e-3 of its terms."""
    batch, heads, group, q_len, n = attn.shape
    flat_attn = attn.reshape(batch, heads, group * q_len, n)
    flat_out = outputs.reshape(batch, heads, group * q_len, -1)
    # the pairs with a > 1/2: at most one per query row, so the row maxima and where they are find them in one
    # pass (no mask over all pairs, no second pass over the rows to find the entry)
    peak, peak_at = flat_attn.max(dim=-1)
    b, h, row = (peak > 0.5).nonzero(as_tuple=True)
    j = peak_at[b, h, row]
    small = torch.rsub(flat_attn, 1.0)
    small = torch.div(flat_attn, small, out=small).square_()
    small[b, h, row, j] = 0.0  # a ≤ 1/2 everywhere else: no clamp needed
    # one pass over the (G·Q) × N ratios: Σ_q r X_q, Σ_q r ‖X_q‖² and Σ_q r for every entry
    # (computed as (D+2) × N: the ratios' rows stay the long, contiguous side of the product)
    sides = torch.cat([flat_out, flat_out.square().sum(-1, keepdim=True), torch.ones_like(flat_out[..., :1])], -1)
    sums = torch.matmul(sides.transpose(-1, -2), small)
    magnitude = sums[..., -2, :] + values.square().sum(-1) * sums[..., -1, :]
    total = magnitude - 2.0 * (sums[..., :-2, :] * values.transpose(-1, -2)).sum(-2)
    # where the expansion lost its precision (result tiny against its terms), recompute that entry directly
    eb, eh, ej = (total < 1e-3 * magnitude).nonzero(as_tuple=True)
    if len(eb):
        exact = (small[eb, eh, :, ej] * (flat_out[eb, eh] - values[eb, eh, ej].unsqueeze(-2)).square().sum(-1)).sum(-1)
        total = total.index_put((eb, eh, ej), exact)
    if len(b):
        ratio_sq = _error_ratio(peak[b, h, row], eps).square()
        direct = _times_ratio(ratio_sq, (flat_out[b, h, row] - values[b, h, j]).square().sum(-1))
        total = total.index_put((b, h, j), direct, accumulate=True)
    return total.clamp_min(0.0).sqrt()


def normalise(base: torch.Tensor) -> torch.Tensor:
    """``ĥ_j = h_j / Σ_k h_k`` over the stored entries (method.md §3)."""
    return base / base.sum(-1, keepdim=True).clamp_min(torch.finfo(base.dtype).tiny)


def caote_meta_scores(base: torch.Tensor, values: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """CAOTE on top of a base policy's scores ``h ≥ 0`` (method.md §3, the "meta-heuristic").

    ``ĥ = h / Σh`` plays the attention weights: ``X̂ = Σ_i ĥ_i v_i``, ``c_j = ĥ_j / (1 - ĥ_j) · ‖X̂ - v_j‖₂``.
    The registry's ``+caote`` computes the same through :func:`row_error_scores` (rows = ``ĥ``).
    """
    rows = normalise(base)[:, :, None, None, :]
    return caote_scores(rows, values, rows @ values.unsqueeze(2), eps)


def fastcaote_meta_scores(base: torch.Tensor, values: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """FastCAOTE (method.md §3): as :func:`caote_meta_scores` with ``X̂`` replaced by the mean stored value."""
    rows = normalise(base)[:, :, None, None, :]
    return caote_scores(rows, values, values.mean(dim=-2)[:, :, None, None, :], eps)


def tova_scores(attn: torch.Tensor) -> torch.Tensor:
    """TOVA (Oren et al. 2024, reference ``schwartz-lab-NLP/TOVA``): attention of the last query only.

    GQA: averaged over the query heads that share the KV head (kvpress convention, method.md §4).
    """
    return attn[..., -1, :].mean(dim=2)


def add_attention_mass(total: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``total += `` the attention each entry receives from the step, summed over its queries and averaged over the
    group; in place (one fused add: H2O pays it at every decode step), returns ``total`` ``(B, H_kv, N)``.

    H2O (Zhang et al. 2023, reference ``FMInference/H2O``) accumulates this over every query seen so far,
    prompt and decoding; the accumulator lives in the cache and follows the entries it scores.
    """
    return total.add_(attn.sum(dim=(2, 3)), alpha=1.0 / attn.shape[2])


def snapkv_scores(attn: torch.Tensor, window: int = 32, kernel: int = 5) -> torch.Tensor:
    """SnapKV (Li et al. 2024, reference ``FasterDecoding/SnapKV``, ``snapkv_utils.py``).

    Attention of the last ``window`` queries (the observation window) summed over those queries, averaged
    over the group, then 1-D average-pooled over the entries outside the window (kernel ``kernel``,
    ``padding = kernel // 2``, zero padding counted, as the reference's ``avg_pool1d``). The window's own
    entries keep their raw votes; the reference always keeps them, and the cache protects them
    (``recent_window = window`` by default). Entries are neighbours in cache order.
    """
    return pool_outside_window(attn[..., -window:, :].sum(dim=3).mean(dim=2), window, kernel)


def pool_outside_window(votes: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """SnapKV's pooling of ``votes`` ``(..., N)``: 1-D average pooling (kernel ``kernel``, zero padding counted, as
    the reference's ``avg_pool1d``) over the entries before the last ``window``; the window keeps its raw votes."""
    n_prefix = votes.shape[-1] - window
    if n_prefix <= 0:
        return votes
    prefix = votes[..., :n_prefix]
    pooled = F.avg_pool1d(prefix.reshape(-1, 1, n_prefix), kernel, stride=1, padding=kernel // 2)
    return torch.cat([pooled.reshape(prefix.shape), votes[..., n_prefix:]], dim=-1)


def streaming_scores(positions: torch.Tensor) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2024, reference ``mit-han-lab/streaming-llm``): the most recent entries win.

    The attention sinks (first ``sink_tokens`` positions) are protected by the cache, not scored here.
    """
    return positions.to(torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# Beyond the paper (method.md §6): where the error lands, sets evicted together, queries still to come.


def output_space_factors(o_proj_weight: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square factors ``R`` with ``‖W u‖ = ‖R u‖`` for each query head's slice of ``o_proj`` (method.md §6).

    ``o_proj_weight`` is ``(d_model, H_q · D)``; query head ``h`` writes to the residual stream through the columns
    ``h·D .. (h+1)·D`` (``W_o,h``, ``d_model × D``). With ``W = Q R`` (reduced QR), ``‖W u‖₂ = ‖R u‖₂`` for every
    ``u``, so an error measured through ``R`` (``D × D``) is exactly the residual-stream error, at the cost of a
    ``D × D`` product instead of a ``d_model × D`` one.

    Returns ``(per_head, per_group)``: ``(H_kv, G, D, D)`` factors of every query head's slice, and ``(H_kv, 1, D,
    D)`` factors of the group's summed slice ``Σ_g W_o,g`` (the residual change of a KV head when every query head of
    its group sees the same output change, as in the ``+caote`` meta-heuristic).
    """
    weight = o_proj_weight.detach().to(torch.float32)
    d_model = weight.shape[0]
    q_heads = weight.shape[1] // head_dim
    slices = weight.view(d_model, q_heads, head_dim).permute(1, 0, 2)  # (H_q, d_model, D)
    per_head = torch.linalg.qr(slices, mode="r").R.view(kv_heads, q_heads // kv_heads, head_dim, head_dim)
    summed = slices.view(kv_heads, q_heads // kv_heads, d_model, head_dim).sum(1)
    per_group = torch.linalg.qr(summed, mode="r").R.view(kv_heads, 1, head_dim, head_dim)
    return per_head, per_group


def row_error_scores(
    rows: torch.Tensor, values: torch.Tensor, outputs: torch.Tensor, factors: torch.Tensor | None = None
) -> torch.Tensor:
    """CAOTE's error ``r/(1−r)·‖X − v_j‖`` for attention-like ``rows`` ``(B, H_kv, G, R, N)``, root-sum-square over
    ``G`` and ``R`` (docs/decisions.md 1), measured in value space or, with ``factors`` ``(H_kv, G, D, D)`` from
    :func:`output_space_factors`, in the residual stream: ``r/(1−r)·‖W_o,g (X − v_j)‖`` per query head ``g``
    (the issue's per-head form; the cross terms between heads of one group are not included, docs/decisions.md).

    ``outputs`` ``(B, H_kv, G, R, D)`` is the output the rows estimate (``Σ r v`` for real attention or CAOTE's
    ``X̂``; FastCAOTE's mean value).
    """
    if factors is None:
        return caote_scores(rows, values, outputs)
    batch, heads, group, n_rows, n = rows.shape
    factors = factors.to(values.dtype)
    head_values = torch.einsum("hgde,bhne->bhgnd", factors, values)
    head_outputs = torch.einsum("hgde,bhgre->bhgrd", factors, outputs)
    per_head = caote_scores(
        rows.reshape(batch, heads * group, 1, n_rows, n),
        head_values.reshape(batch, heads * group, n, -1),
        head_outputs.reshape(batch, heads * group, 1, n_rows, -1),
    ).view(batch, heads, group, n)
    return per_head.square().sum(2).sqrt()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]``: the rotary pairing of Llama-style models (dimension ``i`` with ``i + D/2``)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, offsets: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Advance the rotary phase of ``x`` ``(..., Q, D)`` by ``offsets`` ``(Q,)`` positions.

    RoPE at position ``p`` is a rotation ``R(p)`` of each pair by ``p · inv_freq``; rotations of one pair commute,
    so ``R(p + δ) R(p)^{-1} = R(δ)``: a post-RoPE query at ``p`` becomes the query it would be at ``p + δ`` (same
    pre-RoPE vector) by rotating it by ``δ``.
    """
    inv_freq = inv_freq.to(device=x.device, dtype=torch.float32)
    angles = offsets.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return x * angles.cos() + rotate_half(x) * angles.sin()


def mean_rotation(x: torch.Tensor, future: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``R̄ x`` with ``R̄ = (1/F) Σ_{δ=1..F} R(δ)``: the rotary phase averaged over the next ``future`` positions."""
    inv_freq = inv_freq.to(device=x.device, dtype=torch.float32)
    deltas = torch.arange(1, future + 1, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None, :]
    cos, sin = deltas.cos().mean(0), deltas.sin().mean(0)
    return x * torch.cat([cos, cos]) + rotate_half(x) * torch.cat([sin, sin])


def expected_attention_weights(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    now: int,
    inv_freq: torch.Tensor,
    scaling: float,
    future: int = 512,
    covariance: bool = True,
) -> torch.Tensor:
    """Expected attention of the next ``future`` queries over the stored keys (method.md §6; kvpress
    ``ExpectedAttentionPress``, Devoto et al. 2025), ``(B, H_kv, G, 1, N)``.

    The step's post-RoPE ``queries`` ``(B, H_kv, G, Q, D)`` at ``query_positions`` ``(Q,)`` are moved to position
    ``now`` (:func:`rotate`: the same pre-RoPE vectors, so their statistics are those of pre-RoPE queries seen at
    one position); their mean ``μ`` and covariance ``Σ`` model the next queries, ``N(μ, Σ)``. A query at
    ``now + δ`` is ``R(δ) q``; averaging the rotation over ``δ = 1..future`` gives ``μ' = R̄ μ``,
    ``Σ' = R̄ Σ R̄ᵀ``. With ``s = scaling``, ``E[exp(s q·k)] = exp(s μ'·k + s² kᵀΣ'k / 2)`` (Gaussian moment), and the
    expected weights are those unnormalised expectations normalised over the stored entries.
    DEVIATION from kvpress: statistics come from the post-RoPE queries the attention function receives (phase
    removed by relative rotation, exact for RoPE without ``attention_scaling``), not from re-projected hidden
    states; at a single-query step ``Σ = 0``.
    """
    aligned = rotate(queries, now - query_positions, inv_freq)
    mean = aligned.mean(dim=-2)  # (B, H, G, D)
    logits = scaling * torch.einsum("bhgd,bhnd->bhgn", mean_rotation(mean, future, inv_freq), keys)
    if covariance and queries.shape[-2] > 1:
        centred = aligned - mean.unsqueeze(-2)
        cov = centred.transpose(-1, -2) @ centred / (queries.shape[-2] - 1)  # (B, H, G, D, D)
        dim = queries.shape[-1]
        rot = mean_rotation(torch.eye(dim, dtype=torch.float32, device=keys.device), future, inv_freq).T  # R̄ as a matrix
        cov = rot @ cov @ rot.T
        logits = logits + 0.5 * scaling**2 * torch.einsum("bhnd,bhgde,bhne->bhgn", keys, cov, keys)
    return torch.softmax(logits, dim=-1).unsqueeze(-2)


def joint_eviction_error(rows: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """Exact output error of evicting the set ``evicted`` ``(B, H, N)`` bool at once (method.md §6), ``(B, H)``.

    Per row (``rows`` ``(B, H, R, N)``, each a distribution over the entries, output ``X = Σ a v``):
    ``X − X' = Σ_S a_j (v_j − X) / (1 − a_S)``; rows combine by root-sum-square. A row whose whole mass is in
    ``S`` has no output left: its error is infinite. Computed as ``U − (a_S / a_K) W`` (``U = Σ_S a v``,
    ``W = Σ_K a v`` over the kept entries ``K``, ``a_K = Σ_K a``), the same quantity without the cancellation of
    ``1 − a_S`` and ``U − a_S X`` when the set holds almost all of a row's mass.
    """
    kept = ~evicted.unsqueeze(-2)
    gone_rows, kept_rows = rows * evicted.unsqueeze(-2), rows * kept
    gone_mass, kept_mass = gone_rows.sum(-1, keepdim=True), kept_rows.sum(-1, keepdim=True)  # (B, H, R, 1)
    shift = gone_rows @ values - gone_mass / kept_mass.clamp_min(torch.finfo(kept_mass.dtype).tiny) * (kept_rows @ values)
    error = torch.where(kept_mass <= 0, torch.inf, shift.norm(dim=-1, keepdim=True))
    return error.squeeze(-1).square().sum(-1).sqrt()


def greedy_joint_eviction(
    rows: torch.Tensor, values: torch.Tensor, n_evict: int, candidates: torch.Tensor, round_size: int = 1
) -> torch.Tensor:
    """Entries to evict, chosen greedily on the *joint* error of the growing set (paper's limitation 1).

    ``rows`` ``(B, H, R, N)`` are attention-like distributions (output ``X_r = Σ a v``); ``candidates`` ``(B, H, N)``
    marks the entries that may go. Each round adds the ``round_size`` entries whose addition to the set ``S``
    gives the smallest exact joint error ``Σ_r ‖X_r − X'_r(S ∪ {j})‖²`` (``round_size = 1``: plain greedy; larger
    rounds trade exactness for fewer passes). With ``U_r = Σ_S a v``, ``A_r = Σ_S a``, ``Y_r = X_r − U_r`` and
    ``s = 1 − A_r − a_rj``: ``X'' = (Y_r − a_rj v_j) / s`` and
    ``‖X − X''‖² = ‖X‖² − 2 (X·Y − a X·v_j)/s + (‖Y‖² − 2a Y·v_j + a²‖v_j‖²)/s²``; the dot products are one
    ``R × N`` matmul, updated incrementally. Computed in float64. Returns indices ``(B, H, n_evict)``.
    """
    rows = rows.to(torch.float64)
    values = values.to(torch.float64)
    outputs = rows @ values  # (B, H, R, D)
    x_dot_v = outputs @ values.transpose(-1, -2)  # (B, H, R, N)
    x_sq = outputs.square().sum(-1, keepdim=True)  # (B, H, R, 1)
    v_sq = values.square().sum(-1).unsqueeze(-2)  # (B, H, 1, N)
    removed_mass = torch.zeros_like(x_sq)
    u = torch.zeros_like(outputs)  # Σ_S a v
    u_dot_v = torch.zeros_like(x_dot_v)
    allowed = candidates.clone()
    chosen: list[torch.Tensor] = []
    left = n_evict
    while left > 0:
        take = min(round_size, left)
        y = outputs - u
        y_dot_v = x_dot_v - u_dot_v
        x_dot_y = (outputs * y).sum(-1, keepdim=True)
        y_sq = y.square().sum(-1, keepdim=True)
        survive = 1.0 - removed_mass - rows
        safe = survive.clamp_min(1e-12)
        cost = x_sq - 2.0 * (x_dot_y - rows * x_dot_v) / safe + (y_sq - 2.0 * rows * y_dot_v + rows.square() * v_sq) / safe.square()
        cost = torch.where(survive <= 1e-12, torch.inf, cost.clamp_min(0.0)).sum(-2)  # (B, H, N)
        cost = cost.masked_fill(~allowed, torch.inf)
        picked = cost.topk(take, dim=-1, largest=False).indices  # (B, H, take)
        chosen.append(picked)
        allowed.scatter_(-1, picked, False)
        a_picked = rows.gather(-1, picked.unsqueeze(-2).expand(*rows.shape[:-1], take))  # (B, H, R, take)
        v_picked = values.gather(-2, picked.unsqueeze(-1).expand(*picked.shape, values.shape[-1]))  # (B, H, take, D)
        removed_mass = removed_mass + a_picked.sum(-1, keepdim=True)
        u = u + a_picked @ v_picked
        u_dot_v = u_dot_v + a_picked @ (v_picked @ values.transpose(-1, -2))
        left -= take
    return torch.cat(chosen, dim=-1)


def chunk_eviction(
    entry_scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor | None, n_evict: int, chunk: int,
    seen: int,
) -> torch.Tensor:
    """Evict whole chunks of ``chunk`` consecutive positions (``position // chunk``; ChunkKV, Liu et al. 2025, and
    the block granularity of paged serving caches): the ``ceil(n_evict / chunk)`` chunks with the lowest summed
    score, per batch row and KV head. A chunk holding a protected entry, or the newest chunk while it is incomplete,
    is never evicted.

    ``entry_scores`` / ``positions`` / ``protected`` ``(B, H, N)`` (positions increasing). Evicting only whole chunks
    keeps every stored chunk complete but the newest, so every head evicts the same number of entries. Returns the
    evicted entries' indices ``(B, H, k·chunk)``, increasing. DEVIATION from an exact set error: a chunk's score is
    the sum of its entries' scores (for CAOTE errors, an upper bound of the chunk's joint error without the
    renormalisation by ``1 − Σ a``).
    """
    batch, heads, n = entry_scores.shape
    ids = positions // chunk
    local = torch.zeros_like(ids)
    local[..., 1:] = (ids[..., 1:] != ids[..., :-1]).long().cumsum(-1)  # 0..C-1 per head, chunks contiguous
    n_chunks = int(local[..., -1].max()) + 1
    chunk_scores = torch.zeros(batch, heads, n_chunks, dtype=entry_scores.dtype, device=entry_scores.device)
    chunk_scores.scatter_add_(-1, local, entry_scores.masked_fill(torch.isinf(entry_scores), 1e30))
    blocked = torch.zeros(batch, heads, n_chunks, dtype=torch.bool, device=entry_scores.device)
    if protected is not None:
        blocked.scatter_reduce_(-1, local, protected, reduce="amax")
    if seen % chunk:
        blocked |= (ids[..., -1:] == (seen - 1) // chunk) & (torch.arange(n_chunks, device=ids.device) == n_chunks - 1)
    k = -(-n_evict // chunk)
    if int((~blocked).sum(-1).min()) < k:
        raise ValueError(f"cannot evict {k} chunks of {chunk}: the protected entries cover too many chunks; raise the "
                         "budget or protect fewer tokens")
    chosen = chunk_scores.masked_fill(blocked, float("inf")).topk(k, dim=-1, largest=False).indices
    evicted = torch.zeros_like(blocked).scatter_(-1, chosen, True).gather(-1, local)
    counts = evicted.sum(-1)
    if not bool((counts == counts.flatten()[0]).all()):
        raise RuntimeError("chunk eviction: heads would evict different numbers of entries (an incomplete chunk)")
    return evicted.nonzero()[:, -1].view(batch, heads, -1)
