"""Classification heads that carry their own certificates (soc.md §B2, §C2;
certification.md §2.3, §2.4, §3.2(h),(i), §3.3).

Both heads sit on a feature map h(x) with a guaranteed Lipschitz bound ``lip_features``
(= L, from raw input to the head's input features) and expose the same interface:

* ``head(h) -> logits``;
* ``head.certified_radius(h, lip_features, tau=0.0) -> (pred, radius)``: a sound
  input-space ℓ2 radius around the *predicted* label, minimised over **all** C − 1
  competitors, computed without grad with every bound quantity in float64.  ``tau`` ≥ 0
  is a logit-rounding slack subtracted from every margin: the certificate states that the
  exact (real-arithmetic) margin g_ŷ − g_j stays above ``tau`` on the open ball, so a
  forward pass whose per-logit rounding error is at most tau/2 keeps the prediction.
  A non-positive margin (a tie, or a margin ≤ tau) gives radius 0 (not certified);
  a pair that can never overtake gives +inf for that pair.
* ``head.certificate(h, y, lip_features) -> Tensor[N]``: the differentiable training
  certificate for the true label (negative when misclassified), for the certificate
  regulariser −γ·mean(ReLU(cert)) (soc.md §B3).

Margins are evaluated in float64 from the weights actually used in evaluation (cast
exactly from their storage dtype); the prediction is the argmax of the head's own
forward in its own dtype, so it always matches ``head(h).argmax(1)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linalg import gram_iteration_bound, round_up, spectral_norm
from .base import LipschitzModule, check_input, check_positive_int

__all__ = ["LLNLinear", "MLPHead"]

_EPS64 = 2.0 ** -52
# Final radii are shrunk by a few ulps so the last divisions can never round them up.
_SHRINK = 1.0 - 8 * 2.0 ** -53


# ----------------------------------------------------------------------------- helpers
def _check_lip(lip_features) -> float:
    if isinstance(lip_features, torch.Tensor):
        if lip_features.numel() != 1:
            raise ValueError(f"lip_features must be a scalar, got a tensor of shape {tuple(lip_features.shape)}")
        lip_features = lip_features.item()
    try:
        value = float(lip_features)
    except (TypeError, ValueError):
        raise ValueError(f"lip_features must be a positive finite float, got {lip_features!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"lip_features must be a positive finite float, got {lip_features!r}")
    return value


def _check_tau(tau) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a finite float >= 0, got {tau!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"tau must be a finite float >= 0, got {tau!r}")
    return value


def _check_labels(module: nn.Module, y, n: int, num_classes: int) -> torch.Tensor:
    name = type(module).__name__
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name}.certificate expects integer labels y as a tensor, got {type(y).__name__}"
                         + (f" of dtype {y.dtype}" if isinstance(y, torch.Tensor) else ""))
    if y.shape != (n,):
        raise ValueError(f"{name}.certificate expects labels of shape ({n},), got {tuple(y.shape)}")
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name}.certificate expects labels in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y


def _softplus(u: torch.Tensor, beta: float) -> torch.Tensor:
    """softplus_β(u) = log(1 + exp(βu))/β, evaluated stably for every u.

    Unlike ``F.softplus`` there is no linear cut-over threshold, so the evaluated
    function is the smooth one whose curvature is bounded by β/4.
    """
    # softplus(v) = −log σ(−v): overflow-free, and its autograd first and second
    # derivatives (σ(v), σ(v)(1 − σ(v))) are the true ones everywhere, including v = 0.
    return -F.logsigmoid(-beta * u) / beta


# ----------------------------------------------------------------------------- LLN head
class LLNLinear(LipschitzModule):
    """Linear head with last-layer normalisation (soc.md §B2).

    z = W̃h + b with w̃_j = w_j/‖w_j‖ recomputed every training forward (cached and
    detached in eval through the version-keyed operator cache); the bias is free.

    **Certificate** (certification.md §2.3, §3.2(h)).  For prediction ŷ and slack τ,

        r = min_{j≠ŷ} (z_ŷ − z_j − τ) / (L · ‖w̃_ŷ − w̃_j‖),

    over *all* competitors.  For ‖δ‖ < r every difference z_ŷ − z_j, which is
    ‖w̃_ŷ − w̃_j‖·L-Lipschitz in the input, stays above τ.  The pairwise norms come from
    the Gram matrix of the cached normalised rows in float64,
    ‖w̃_i − w̃_j‖² = G_ii + G_jj − 2G_ij, plus a rounding guard
    (n + 4)·2⁻⁵²·(G_ii + G_jj + 2√(G_ii G_jj)) that dominates the float64 error of the
    Gram entries (n = in_features), so the norms are never under-estimated; pairs of
    bitwise identical rows get norm exactly 0 (+inf radius for that pair when the margin
    is positive, 0 otherwise).  They are cached per weight version.

    The head has no global 1-Lipschitz bound (its norm can reach √C);
    ``lipschitz_bound()`` returns the exact spectral norm of the normalised weight.
    """

    guarantee = "bounded"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features, 1)
        self.out_features = check_positive_int("out_features", out_features, 2)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool, got {bias!r}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(in_features))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)
        object.__setattr__(self, "_pair_cache", None)

    # -- LipschitzModule interface ------------------------------------------------------
    def compute_operator(self):
        w = self.weight
        w_tilde = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return w_tilde, self.bias

    def apply_operator(self, x: torch.Tensor, op) -> torch.Tensor:
        w, b = op
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def compute_lipschitz_bound(self, op, input_size) -> float:
        return spectral_norm(op[0])

    def check_input(self, x: torch.Tensor) -> None:
        check_input(self, x, 2, self.in_features)

    def __getstate__(self):
        state = super().__getstate__()
        state["_pair_cache"] = None
        return state

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        object.__setattr__(self, "_pair_cache", None)

    # -- certificates -------------------------------------------------------------------
    def pairwise_norms(self) -> torch.Tensor:
        """(C, C) float64 upper bounds on ‖w̃_i − w̃_j‖ for the eval weights (cached)."""
        key = self._cache_key()
        cache = self._pair_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            w = self.cached_operator()[0].to(torch.float64)
            gram = w @ w.T
            sq = gram.diagonal()
            norm_i = sq.sqrt()
            dist2 = sq[:, None] + sq[None, :] - 2 * gram
            scale = sq[:, None] + sq[None, :] + 2 * norm_i[:, None] * norm_i[None, :]
            guard = (self.in_features + 4) * _EPS64 * scale
            norms = (dist2 + guard).clamp_min(0).sqrt() * (1 + 4 * _EPS64)
            # Exactly identical rows (only possible where the guarded norm is tiny).
            suspects = torch.nonzero(dist2 <= 4 * guard)
            if suspects.numel():
                same = (w[suspects[:, 0]] == w[suspects[:, 1]]).all(dim=1)
                hit = suspects[same]
                norms[hit[:, 0], hit[:, 1]] = 0.0
            norms.fill_diagonal_(0.0)
        object.__setattr__(self, "_pair_cache", (self._cache_key(), norms))
        return norms

    def certified_radius(self, h: torch.Tensor, lip_features: float, tau: float = 0.0):
        """Sound input-space radius around the predicted label (see class docstring).

        Returns ``(pred, radius)``: ``pred`` LongTensor[N] (argmax of this head's forward)
        and ``radius`` float64 Tensor[N] = min over all j ≠ pred of
        (z_pred − z_j − tau) / (lip_features · ‖w̃_pred − w̃_j‖), clamped at 0.
        """
        self.check_input(h)
        lip = _check_lip(lip_features)
        tau = _check_tau(tau)
        with torch.no_grad():
            op = self.cached_operator()
            pred = self.apply_operator(h, op).argmax(dim=1)
            w = op[0].to(torch.float64)
            z = h.to(torch.float64) @ w.T
            if op[1] is not None:
                z = z + op[1].to(torch.float64)
            margin = z.gather(1, pred[:, None]) - z - tau
            norms = self.pairwise_norms().to(h.device)[pred]
            ratio = torch.where(norms > 0, margin / norms.clamp_min(1e-300), torch.full_like(margin, math.inf))
            ratio = torch.where(margin > 0, ratio, torch.zeros_like(ratio))
            ratio.scatter_(1, pred[:, None], math.inf)
            radius = (ratio.min(dim=1).values / lip * _SHRINK).clamp_min(0)
        return pred, radius

    def certificate(self, h: torch.Tensor, y: torch.Tensor, lip_features: float) -> torch.Tensor:
        """Differentiable certificate for the true label (soc.md §B3):
        min_{j≠y} (z_y − z_j) / (L·‖w̃_y − w̃_j‖), negative when misclassified.
        Gradients flow through the normalised weights (training mode)."""
        self.check_input(h)
        lip = _check_lip(lip_features)
        y = _check_labels(self, y, h.shape[0], self.out_features)
        op = self.operator()
        z = self.apply_operator(h, op)
        w = op[0].to(z.dtype)
        gram = w @ w.T
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(1e-12).sqrt()
        margin = z.gather(1, y[:, None]) - z
        ratio = margin / (lip * dist[y])
        ratio = ratio.scatter(1, y[:, None], math.inf)
        return ratio.min(dim=1).values

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------- MLP head
class MLPHead(LipschitzModule):
    """Two-layer head g(h) = W₂ softplus_β(W₁h + b₁) + b₂ with a curvature certificate
    (soc.md §C2, certification.md §2.4, §3.2(i)).

    W₁ (``weight1``, hidden × in), b₁, W₂ (``weight2``, classes × hidden), b₂ are
    unconstrained and should not be weight-decayed (class attribute ``no_weight_decay``).
    softplus_β(u) = log(1 + e^{βu})/β is evaluated stably without a linear cut-over,
    so softplus″ = βσ(βu)(1 − σ(βu)) ∈ (0, β/4] everywhere.

    **Curvature constants.**  For the ordered pair (y, j), f = g_y − g_j has Hessian
    W₁ᵀ diag(d ⊙ softplus″) W₁ with d = w₂,y − w₂,j, hence for every h

        −m_{yj} I ⪯ ∇²f ⪯ M_{yj} I,  M_{yj} = (β/4) λ_max(W₁ᵀ diag(d₊) W₁),
                                      m_{yj} = (β/4) λ_max(W₁ᵀ diag(d₋) W₁) = M_{jy}.

    ``curvature_constants()`` computes them for all C(C − 1) ordered pairs in float64 by
    exact symmetric eigenvalues (``torch.linalg.eigvalsh`` on the smaller of AᵀA and AAᵀ,
    A = diag(√d₊) W₁ restricted to the rows with d₊ > 0), adds a rounding guard
    4·(k + s + 8)·2⁻⁵²·‖A‖_F² (k, s the dimensions of A; it dominates the float64 error of
    forming the Gram matrix and of a backward-stable eigensolver) and rounds up.  They are
    input-independent and cached per weight version.  Cost: C(C − 1) eigenproblems of
    size ≤ min(in_features, #{d₊ > 0}) — a few seconds per pair at size 2048 on one CPU
    core (minutes for CIFAR-10's 90 pairs, once per model); ``curvature_method="gram"``
    uses the Gram-iteration upper bound instead.

    **Closed-form certificate.**  For the prediction y and competitor j with
    f = g_y − g_j − τ > 0 at h, f(h + δ) ≥ f + ∇fᵀδ − (m/2)‖δ‖² with m = m_{yj}, which
    stays positive while ‖δ‖ < ρ = (√(‖∇f‖² + 2mf) − ‖∇f‖)/m, computed in the
    cancellation-free form ρ = 2f / (‖∇f‖ + √(‖∇f‖² + 2mf)) (= f/‖∇f‖ when m = 0).

    **Dual certificate.**  For η ∈ [0, 1/m), every δ with f(h + δ) ≤ 0 has
    ‖δ‖² ≥ ‖δ‖² + 2ηf(h + δ) ≥ D(η) = min_δ φ_η(δ), φ_η(δ) = ‖δ‖² + 2ηf(h + δ), and φ_η is
    μ-strongly convex with μ = 2(1 − ηm).  For *any* iterate δ_k,
    D(η) ≥ φ_η(δ_k) − ‖∇φ_η(δ_k)‖²/(2μ), so √max(0, ·) is a sound radius however early the
    inner solver stops.  η is searched by bracketing/bisection on the sign of
    f(h + δ_k) (the derivative of the concave D is 2f(h + δ*(η))), each inner problem is
    solved by damped Newton steps with a batched conjugate-gradient solve of
    (I + η∇²f)p = −∇φ/2 (Hessian-vector products, never a dense Hessian), warm-started
    along the η path; the best sound value over all visited η is kept.  The reported
    pair radius is max(closed form, dual) (both sound), minimised over all competitors,
    divided by L.

    Cost of the dual: about ``bisection_steps·newton_steps·(cg_steps + 5)`` products of a
    (problems × in_features) and a (problems × hidden) matrix with W₁ per problem
    (one problem = one sample-competitor pair); the inner loops exit early once every
    problem of a batch has converged (sub-optimality penalty ≤ 1e-13·φ, CG residual
    ≤ 1e-12 relative, η bracket ≤ 1e-4 relative).  Pairs are pruned without loss: after the
    competitor with the smallest closed-form radius is solved, only competitors whose
    closed-form radius is below the resulting value can lower the minimum.  Measured on
    one loaded CPU thread: 500 samples × 10 classes with in=256, hidden=512 take ≈ 4 s
    (529 of 4500 pairs solved after pruning), the closed form 0.1 s; the cost grows
    linearly in the solved pairs and in in_features·hidden (so 10 000 samples at
    2048/4096 is a GPU job: ~10³ times the work, a few seconds to a minute there).
    """

    guarantee = "bounded"
    no_weight_decay = True

    def __init__(self, in_features: int, hidden_features: int, num_classes: int, beta: float = 1.0) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features, 1)
        self.hidden_features = check_positive_int("hidden_features", hidden_features, 1)
        self.num_classes = check_positive_int("num_classes", num_classes, 2)
        try:
            beta_value = float(beta)
        except (TypeError, ValueError):
            raise ValueError(f"beta must be a positive finite float, got {beta!r}") from None
        if not (math.isfinite(beta_value) and beta_value > 0):
            raise ValueError(f"beta must be a positive finite float, got {beta!r}")
        self.beta = beta_value
        self.weight1 = nn.Parameter(torch.empty(hidden_features, in_features))
        self.bias1 = nn.Parameter(torch.empty(hidden_features))
        self.weight2 = nn.Parameter(torch.empty(num_classes, hidden_features))
        self.bias2 = nn.Parameter(torch.empty(num_classes))
        for w, b, fan_in in ((self.weight1, self.bias1, in_features), (self.weight2, self.bias2, hidden_features)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        object.__setattr__(self, "_curv_cache", {})

    # -- LipschitzModule interface ------------------------------------------------------
    def _extra_cache_key(self) -> tuple:
        return (self.beta,)

    def compute_operator(self):
        return self.weight1, self.bias1, self.weight2, self.bias2

    def apply_operator(self, x: torch.Tensor, op) -> torch.Tensor:
        w1, b1, w2, b2 = (t.to(x.dtype) for t in op)
        return F.linear(_softplus(F.linear(x, w1, b1), self.beta), w2, b2)

    def compute_lipschitz_bound(self, op, input_size) -> float:
        # softplus is 1-Lipschitz (its derivative is σ ∈ (0, 1)).
        return round_up(spectral_norm(op[0]) * spectral_norm(op[2]))

    def check_input(self, x: torch.Tensor) -> None:
        check_input(self, x, 2, self.in_features)

    def __getstate__(self):
        state = super().__getstate__()
        state["_curv_cache"] = {}
        return state

    def invalidate_cache(self) -> None:
        super().invalidate_cache()
        object.__setattr__(self, "_curv_cache", {})

    def _weights64(self):
        return tuple(t.detach().to(torch.float64) for t in (self.weight1, self.bias1, self.weight2, self.bias2))

    # -- curvature ------------------------------------------------------------------------
    def curvature_constants(self, method: str = "eigh") -> tuple[torch.Tensor, torch.Tensor]:
        """Guaranteed curvature bounds ``(M, m)``, each (C, C) float64 with zero diagonal:
        −m[y, j]·I ⪯ ∇²(g_y − g_j) ⪯ M[y, j]·I for every input.  ``method``: "eigh" (exact
        eigenvalues, rounded up) or "gram" (Gram-iteration upper bound).  Cached per
        weight version; never differentiable."""
        if method not in ("eigh", "gram"):
            raise ValueError(f"curvature method must be 'eigh' or 'gram', got {method!r}")
        key = (self._cache_key(), method)
        cache = self._curv_cache
        if key in cache:
            return cache[key]
        with torch.no_grad():
            w1, _, w2, _ = self._weights64()
            c = self.num_classes
            upper = torch.zeros(c, c, dtype=torch.float64, device=w1.device)
            for y in range(c):
                for j in range(c):
                    if y != j:
                        upper[y, j] = self._pair_curvature(w1, w2[y] - w2[j], method)
        result = (upper, upper.T.contiguous())
        # Keep only the current weight version (both methods may live side by side).
        fresh = {k: v for k, v in cache.items() if k[0] == key[0]}
        fresh[key] = result
        object.__setattr__(self, "_curv_cache", fresh)
        return result

    def _pair_curvature(self, w1: torch.Tensor, d: torch.Tensor, method: str) -> float:
        """(β/4)·λ_max(W₁ᵀ diag(d₊) W₁), guaranteed not to be under-estimated."""
        keep = d > 0
        s = int(keep.sum())
        if s == 0:
            return 0.0
        a = d[keep].sqrt()[:, None] * w1[keep]
        rows, cols = a.shape
        fro2 = float((a * a).sum())
        if method == "eigh":
            gram = a @ a.T if rows <= cols else a.T @ a
            lam = float(torch.linalg.eigvalsh(gram)[-1])
            lam = max(lam, 0.0) + 4 * (rows + cols + 8) * _EPS64 * fro2
        else:
            sigma = gram_iteration_bound(a, steps=8)
            lam = round_up(sigma * sigma)
        lam = min(round_up(lam), round_up(fro2 * (1 + 4 * (rows + cols + 8) * _EPS64)))
        return round_up(self.beta / 4 * lam)

    def curvature_penalty(self, method: str = "frobenius") -> torch.Tensor:
        """Differentiable curvature regulariser: mean over ordered pairs y ≠ j of
        max(M_yj, m_yj) (soc.md §C2 "CE + β_curv · mean(max(m, M))").

        ``"frobenius"`` (default, cheap): (β/4)·Σ_i (d₊)_i ‖w₁,i‖² = (β/4)‖diag(√d₊)W₁‖_F²,
        itself an upper bound on M.  ``"exact"``: differentiable (β/4)·λ_max by
        ``eigvalsh`` in the parameter dtype (small heads only)."""
        c = self.num_classes
        w1, w2 = self.weight1, self.weight2
        diff = w2[:, None, :] - w2[None, :, :]  # (C, C, H): d for pair (y, j)
        if method == "frobenius":
            row2 = (w1 * w1).sum(dim=1)
            upper = torch.relu(diff) @ row2
        elif method == "exact":
            # W₁ᵀ diag(d₊) W₁ for every pair, (C², D, D); no square root, so the gradient
            # stays finite where d₊ vanishes.
            pos = torch.relu(diff).reshape(c * c, -1, 1)
            gram = w1.T @ (pos * w1)
            upper = torch.linalg.eigvalsh(gram)[:, -1].reshape(c, c)
        else:
            raise ValueError(f"curvature_penalty method must be 'frobenius' or 'exact', got {method!r}")
        upper = self.beta / 4 * upper
        pair_max = torch.maximum(upper, upper.T)
        off = ~torch.eye(c, dtype=torch.bool, device=pair_max.device)
        return pair_max[off].mean()

    # -- per-pair quantities --------------------------------------------------------------
    def _center_terms(self, h64: torch.Tensor, pred: torch.Tensor, tau: float):
        """f[n, j] = g_pred − g_j − τ and ‖∇f[n, j]‖ in float64 (pred column: f = +inf)."""
        w1, b1, w2, b2 = self._weights64()
        n, c = h64.shape[0], self.num_classes
        fvals = torch.empty(n, c, dtype=torch.float64, device=h64.device)
        gnorm = torch.empty(n, c, dtype=torch.float64, device=h64.device)
        chunk = max(1, (1 << 23) // max(1, c * max(self.in_features, self.hidden_features)))
        for start in range(0, n, chunk):
            hs, ps = h64[start:start + chunk], pred[start:start + chunk]
            u = F.linear(hs, w1, b1)
            g = F.linear(_softplus(u, self.beta), w2, b2)
            sig = torch.sigmoid(self.beta * u)
            # d for every (sample, competitor): w₂,pred − w₂,j  → ∇f = W₁ᵀ(σ ⊙ d)
            dv = w2[ps][:, None, :] - w2[None, :, :]
            grads = (sig[:, None, :] * dv) @ w1
            fvals[start:start + chunk] = g.gather(1, ps[:, None]) - g - tau
            gnorm[start:start + chunk] = grads.norm(dim=2)
        fvals.scatter_(1, pred[:, None], math.inf)
        gnorm.scatter_(1, pred[:, None], 0.0)
        return fvals, gnorm

    @staticmethod
    def _closed_form(f: torch.Tensor, gnorm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """ρ = 2f/(‖∇f‖ + √(‖∇f‖² + 2mf)) for f > 0, else 0 (feature space)."""
        fp = f.clamp_min(0)
        denom = gnorm + torch.sqrt(gnorm * gnorm + 2 * m * fp)
        rho = torch.where(denom > 0, 2 * fp / denom.clamp_min(1e-300), torch.full_like(f, math.inf))
        return torch.where(f > 0, rho, torch.zeros_like(f))

    def pairwise_feature_radii(
        self,
        h: torch.Tensor,
        tau: float = 0.0,
        method: str = "dual",
        *,
        prune: bool = False,
        bisection_steps: int = 10,
        newton_steps: int = 4,
        cg_steps: int = 10,
        chunk_size: int = 4096,
        curvature_method: str = "eigh",
    ):
        """Feature-space radii per (sample, competitor) pair, without grad.

        Returns ``(pred, closed, dual)``: ``closed`` (N, C) float64 closed-form radii
        (+inf in the pred column, 0 where f ≤ 0); ``dual`` (N, C) float64 raw sound dual
        values (not max-ed with ``closed``), NaN where not computed (pred column, f ≤ 0,
        pairs pruned when ``prune``), or None for ``method="closed_form"``."""
        if method not in ("closed_form", "dual"):
            raise ValueError(f"method must be 'closed_form' or 'dual', got {method!r}")
        check_positive_int("bisection_steps", bisection_steps, 1)
        check_positive_int("newton_steps", newton_steps, 0)
        check_positive_int("cg_steps", cg_steps, 0)
        check_positive_int("chunk_size", chunk_size, 1)
        self.check_input(h)
        tau = _check_tau(tau)
        m_all = self.curvature_constants(curvature_method)[1].to(h.device)
        with torch.no_grad():
            pred = self.apply_operator(h, self.cached_operator()).argmax(dim=1)
            h64 = h.detach().to(torch.float64)
            fvals, gnorm = self._center_terms(h64, pred, tau)
            m_pair = m_all[pred]
            closed = self._closed_form(fvals, gnorm, m_pair)
            closed.scatter_(1, pred[:, None], math.inf)
            if method == "closed_form":
                return pred, closed, None
            dual = torch.full_like(closed, math.nan)
            valid = (fvals > 0).all(dim=1)
            solver = dict(bisection_steps=bisection_steps, newton_steps=newton_steps, cg_steps=cg_steps,
                          chunk_size=chunk_size)
            candidates = valid[:, None] & torch.isfinite(closed)
            if prune:
                first = closed.argmin(dim=1)
                rows = torch.nonzero(valid & torch.isfinite(closed.gather(1, first[:, None]).squeeze(1))).squeeze(1)
                cols = first[rows]
                self._solve_dual(h64, pred, rows, cols, fvals, m_pair, dual, tau, solver)
                best = torch.full((h.shape[0],), math.inf, dtype=torch.float64, device=h.device)
                best[rows] = torch.maximum(closed[rows, cols], dual[rows, cols])
                candidates = candidates & (closed < best[:, None])
                candidates[rows, cols] = False
            rows, cols = torch.nonzero(candidates, as_tuple=True)
            self._solve_dual(h64, pred, rows, cols, fvals, m_pair, dual, tau, solver)
        return pred, closed, dual

    def _solve_dual(self, h64, pred, rows, cols, fvals, m_pair, out, tau, solver) -> None:
        if rows.numel() == 0:
            return
        w1, b1, w2, b2 = self._weights64()
        chunk = solver["chunk_size"]
        for start in range(0, rows.numel(), chunk):
            r, c = rows[start:start + chunk], cols[start:start + chunk]
            p = pred[r]
            dv = w2[p] - w2[c]
            const = b2[p] - b2[c] - tau
            sq = _dual_lower_bound(
                h64[r], dv, const, m_pair[r, c], w1, b1, self.beta,
                solver["bisection_steps"], solver["newton_steps"], solver["cg_steps"],
            )
            out[r, c] = sq.sqrt()

    def certified_radius(
        self,
        h: torch.Tensor,
        lip_features: float,
        tau: float = 0.0,
        method: str = "dual",
        **solver,
    ):
        """Sound input-space radius around the predicted label.

        ``method="closed_form"``: min_j ρ_j / L with the closed form; ``"dual"``
        (default): min_j max(ρ_j, dual_j) / L.  ``solver`` keywords (``bisection_steps``,
        ``newton_steps``, ``cg_steps``, ``chunk_size``, ``prune`` (default True),
        ``curvature_method``) go to :meth:`pairwise_feature_radii`.  Returns
        ``(pred, radius)`` with radius float64, 0 when some margin is ≤ tau."""
        lip = _check_lip(lip_features)
        solver.setdefault("prune", True)
        pred, closed, dual = self.pairwise_feature_radii(h, tau=tau, method=method, **solver)
        per_pair = closed if dual is None else torch.fmax(closed, dual)
        radius = (per_pair.min(dim=1).values / lip * _SHRINK).clamp_min(0)
        return pred, radius

    def certificate(self, h: torch.Tensor, y: torch.Tensor, lip_features: float,
                    curvature: str = "exact") -> torch.Tensor:
        """Differentiable closed-form certificate for the true label y (soc.md §B3, §C2):

            cert = min_{j≠y} 2f_j / (L·(‖∇f_j‖ + √(‖∇f_j‖² + 2K_j|f_j|))),  f_j = g_y − g_j,

        with K_j = m_{yj} when f_j ≥ 0 and M_{yj} when f_j < 0, so cert < 0 exactly when
        some class beats y.  ``curvature="exact"`` uses the cached guaranteed constants of
        :meth:`curvature_constants` (detached; recomputed when the weights change, which
        costs C(C−1) eigenproblems per optimiser step), so for correctly classified
        points it equals the closed-form ``certified_radius`` with tau = 0;
        ``"frobenius"`` uses the differentiable Frobenius upper bounds (cheap, and the
        gradient also flows into the curvature)."""
        self.check_input(h)
        lip = _check_lip(lip_features)
        y = _check_labels(self, y, h.shape[0], self.num_classes)
        w1, b1, w2, b2 = (t.to(h.dtype) for t in self.operator())
        u = F.linear(h, w1, b1)
        g = F.linear(_softplus(u, self.beta), w2, b2)
        sig = torch.sigmoid(self.beta * u)
        dv = w2[y][:, None, :] - w2[None, :, :]  # (N, C, H)
        grads = (sig[:, None, :] * dv) @ w1  # (N, C, D)
        gnorm = (grads * grads).sum(dim=2).clamp_min(1e-30).sqrt()
        f = g.gather(1, y[:, None]) - g
        if curvature == "exact":
            upper, lower = (t.to(device=h.device, dtype=h.dtype) for t in self.curvature_constants("eigh"))
        elif curvature == "frobenius":
            row2 = (w1 * w1).sum(dim=1)
            upper = self.beta / 4 * (torch.relu(w2[:, None, :] - w2[None, :, :]) @ row2)
            lower = upper.T
        else:
            raise ValueError(f"certificate curvature must be 'exact' or 'frobenius', got {curvature!r}")
        k = torch.where(f >= 0, lower[y], upper[y])
        denom = gnorm + torch.sqrt(gnorm * gnorm + 2 * k * f.abs())
        cert = 2 * f / (lip * denom.clamp_min(1e-30))
        cert = cert.scatter(1, y[:, None], math.inf)
        return cert.min(dim=1).values

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"num_classes={self.num_classes}, beta={self.beta}")


# ----------------------------------------------------------------------------- dual solver
def _dual_lower_bound(x0, dv, const, m, w1, b1, beta, bisection_steps, newton_steps, cg_steps):
    """Sound lower bound on min{‖δ‖² : f(x0 + δ) ≤ 0}, batched over B problems, float64.

    f(x) = dvᵀ softplus_β(W₁x + b₁) + const (one row of ``dv``/``const`` per problem) with
    f(x0) > 0 and ∇²f ⪰ −m·I.  Returns max over the visited η of
    φ_η(δ_k) − ‖∇φ_η(δ_k)‖²/(2μ_η) (clamped at 0), μ_η = 2(1 − ηm); see MLPHead.
    """

    def evaluate(x, need_grad=True):
        u = F.linear(x, w1, b1)
        f = (_softplus(u, beta) * dv).sum(dim=1) + const
        if not need_grad:
            return f, None, None
        sig = torch.sigmoid(beta * u)
        grad = (sig * dv) @ w1
        curv = dv * (beta * sig * (1 - sig))
        return f, grad, curv

    f0, g0, _ = evaluate(x0)
    gn2 = (g0 * g0).sum(dim=1)
    eta_max = torch.where(m > 0, (1 - 1e-6) / m.clamp_min(1e-300), torch.full_like(m, math.inf))
    eta_lin = torch.where(gn2 > 0, f0 / gn2.clamp_min(1e-300), torch.full_like(f0, math.inf))
    eta = torch.minimum(eta_lin, 0.5 * eta_max)
    eta = torch.where(torch.isfinite(eta), eta, torch.ones_like(eta))
    lo = torch.zeros_like(eta)
    hi = eta_max.clone()
    delta = -eta[:, None] * g0
    best = torch.zeros_like(eta)

    def phi_of(delta_, f_, eta_):
        return (delta_ * delta_).sum(dim=1) + 2 * eta_ * f_

    for _ in range(bisection_steps):
        e = eta[:, None]
        mu = 2 * (1 - eta * m) * (1 - 1e-12)
        for k in range(newton_steps + 1):
            f, grad_f, curv = evaluate(x0 + delta)
            phi = phi_of(delta, f, eta)
            half_grad = delta + e * grad_f
            # Sub-optimality penalty ‖∇φ‖²/(2μ) with ∇φ = 2·half_grad.
            penalty = 2 * (half_grad * half_grad).sum(dim=1) / mu
            if k == newton_steps or bool((penalty <= 1e-13 * phi.abs()).all()):
                break

            def hvp(v):
                return v + e * ((F.linear(v, w1) * curv) @ w1)

            step = _batched_cg(hvp, -half_grad, cg_steps)
            best_phi, best_delta = phi, delta
            for t in (1.0, 0.5, 0.25):
                trial = delta + t * step
                f_t, _, _ = evaluate(x0 + trial, need_grad=False)
                phi_t = phi_of(trial, f_t, eta)
                better = phi_t < best_phi
                best_phi = torch.where(better, phi_t, best_phi)
                best_delta = torch.where(better[:, None], trial, best_delta)
            delta = best_delta
        value = phi - penalty
        value = torch.where(torch.isfinite(value) & (mu > 0), value, torch.zeros_like(value))
        best = torch.maximum(best, value)
        # D'(η) = 2 f(x0 + δ*(η)): positive → the optimum lies at a larger η.
        up = f > 0
        lo = torch.where(up, eta, lo)
        hi = torch.where(up, hi, eta)
        eta = torch.where(
            torch.isinf(hi),
            2 * lo,
            torch.where(lo == 0, hi / 2, torch.where(hi > 4 * lo, torch.sqrt(lo * hi), (lo + hi) / 2)),
        )
        if bool(((hi - lo) <= 1e-4 * hi).all()):
            break
    return best.clamp_min(0)


def _batched_cg(apply_a, rhs, steps):
    """Conjugate gradients for B independent SPD systems A_b x_b = rhs_b, from x = 0."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    rs0 = rs
    for _ in range(steps):
        if bool((rs <= 1e-24 * rs0).all()):
            break
        ap = apply_a(p)
        pap = (p * ap).sum(dim=1)
        alpha = torch.where(pap > 0, rs / pap.clamp_min(1e-300), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(dim=1)
        beta_cg = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = r + beta_cg[:, None] * p
        rs = rs_new
    return x
