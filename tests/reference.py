"""Independent NumPy float64 re-implementations of the algorithms, written from
docs/reference/algorithms.md.

These never call danlu; tests compare danlu against them.
"""

from __future__ import annotations

import functools

import numpy as np


def lion_step(theta, m, g, *, lr, beta1, beta2, wd):
    """docs/reference/algorithms.md#lion-rule. Returns (theta, m)."""
    theta, m, g = (np.asarray(x, dtype=np.float64) for x in (theta, m, g))
    c = beta1 * m + (1 - beta1) * g
    new_theta = theta - lr * (np.sign(c) + wd * theta)
    new_m = beta2 * m + (1 - beta2) * g
    return new_theta, new_m


def tiger_eta(theta, *, lr, kind, rms_floor):
    theta = np.asarray(theta, dtype=np.float64)
    if kind == "elementwise":
        return 0.5 * lr
    if kind == "matrix":
        return lr * max(np.sqrt(np.mean(theta**2)), rms_floor)
    rms_rows = np.sqrt(np.mean(theta**2, axis=-1, keepdims=True))
    return lr * np.maximum(rms_rows, rms_floor)


def tiger_step(theta, m, g, *, lr, beta, wd, kind, rms_floor=0.0):
    """docs/reference/algorithms.md#tiger-rule, k = 1, written as the reference code: u = (sign(m) +
    d·θ)·η."""
    theta, m, g = (np.asarray(x, dtype=np.float64) for x in (theta, m, g))
    if kind == "elementwise":
        wd = 0.0
    new_m = beta * m + (1 - beta) * g
    eta = tiger_eta(theta, lr=lr, kind=kind, rms_floor=rms_floor)
    new_theta = theta - eta * (np.sign(new_m) + wd * theta)
    return new_theta, new_m


def tiger_accumulated(theta, micro_grads, *, k, lr, beta, wd, kind, rms_floor=0.0):
    """docs/reference/algorithms.md#tiger-rule/#hidden-accumulation-rule literally, 1-based t: decay
    at the first micro-step of each window, add (1-β)g/k every micro-step, update when k | t.
    Returns the (θ, m) history per micro-step."""
    theta = np.asarray(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    history = []
    for t, g in enumerate(micro_grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        decay = beta if (t - 1) % k == 0 else 1.0
        m = decay * m + (1 - beta) / k * g
        if t % k == 0:
            w = 0.0 if kind == "elementwise" else wd
            eta = tiger_eta(theta, lr=lr, kind=kind, rms_floor=rms_floor)
            theta = theta - eta * (np.sign(m) + w * theta)
        history.append((theta.copy(), m.copy()))
    return history


# ----------------------------------------------------------------------------------------------
# Recipes: docs/reference/algorithms.md#initialisation (init) and
# docs/reference/algorithms.md#lr-batch-size (lr vs batch size), by quadrature and by the moment
# matrices.


@functools.cache
def _legendre_nodes(points):
    return np.polynomial.legendre.leggauss(points)


def gauss_legendre(fn, lo, hi, points=200):
    """∫_lo^hi fn(x) dx by Gauss-Legendre quadrature (exact for smooth fn on short intervals)."""
    nodes, weights = _legendre_nodes(points)
    x = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
    return 0.5 * (hi - lo) * float(np.sum(weights * fn(x)))


def normal_pdf(x):
    return np.exp(-0.5 * np.asarray(x, dtype=np.float64) ** 2) / np.sqrt(2 * np.pi)


def truncated_normal_variance(c):
    """docs/reference/algorithms.md#initialisation: γ = ∫x²φ / ∫φ over [-c, c]."""
    return gauss_legendre(lambda x: x * x * normal_pdf(x), -c, c) / gauss_legendre(
        normal_pdf, -c, c
    )


def clip_mean_by_quadrature(a, b, reach=14.0):
    """E[clip(z/b, -1, 1)], z ~ N(a, 1), integrated piecewise between the kinks at ±b."""
    lo, hi = a - reach, a + reach
    density = lambda z: normal_pdf(z - a)  # noqa: E731
    left = -gauss_legendre(density, lo, -b) if lo < -b else 0.0
    middle = gauss_legendre(lambda z: z / b * density(z), -b, b)
    right = gauss_legendre(density, b, hi) if hi > b else 0.0
    return left + middle + right


def softsign_opt_lr(batch, g, sigma2, hessian, eps):
    """docs/reference/algorithms.md#lr-batch-size from the moment matrices: E[φ] = βν, E[φφᵀ] =
    β²ννᵀ + (1-β²)I, and η* = E[φ]·g / Σ_ij H_ij E[φφᵀ]_ij (the maximiser of η E[φ]·g - η²/2
    E[φᵀHφ])."""
    g, sigma2, h = (np.asarray(x, dtype=np.float64) for x in (g, sigma2, hessian))
    nu = g / np.sqrt(g * g + eps * eps)
    kappa2 = np.mean(sigma2 / (g * g + eps * eps))
    beta2 = 1.0 / (1.0 + np.pi * kappa2 / (2.0 * batch))
    mean = np.sqrt(beta2) * nu
    second = beta2 * np.outer(nu, nu) + (1.0 - beta2) * np.eye(len(g))
    return float(mean @ g) / float(np.sum(h * second))


def noise_scale_from_micro_grads(grads, micro_batch):
    """(tr Σ, |g|²) from K micro-batch gradients of ``micro_batch`` samples each, by the
    across-gradient variance (docs/reference/algorithms.md#lr-batch-size-helpers): tr Σ = b·Σ_i
    s_i², |g|² = |ḡ|² - tr Σ/(K b)."""
    grads = np.asarray(grads, dtype=np.float64)
    k = grads.shape[0]
    trace = micro_batch * float(np.sum(np.var(grads, axis=0, ddof=1)))
    mean = grads.mean(axis=0)
    return trace, float(mean @ mean) - trace / (k * micro_batch)


def adam_accumulated(
    theta, micro_grads, *, k, lr, beta1, beta2, eps, wd=0.0, eps_inside_sqrt=False
):
    """docs/reference/algorithms.md#hidden-accumulation-rule literally, 1-based micro-step t: decay
    the moments when (t-1) % k == 0, add (1-β)/k of g (of g² for v) every micro-step, update when k
    | t with bias correction over the update count n = t/k and decoupled decay θ(1 - ηλ). With k = 1
    this is AdamW. Returns the (θ, m, v) history per micro-step."""
    theta = np.asarray(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    history = []
    for t, g in enumerate(micro_grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        if (t - 1) % k == 0:
            m = beta1 * m
            v = beta2 * v
        m = m + (1 - beta1) / k * g
        v = v + (1 - beta2) / k * g * g
        if t % k == 0:
            n = t // k
            m_hat = m / (1 - beta1**n)
            v_hat = v / (1 - beta2**n)
            denom = np.sqrt(v_hat + eps) if eps_inside_sqrt else np.sqrt(v_hat) + eps
            theta = theta * (1 - lr * wd) - lr * m_hat / denom
        history.append((theta.copy(), m.copy(), v.copy()))
    return history


def adam_lazy_rows(theta, grads, *, lr, beta1, beta2, eps, variant):
    """Adam on a table (rows × dim) with the row mask r_i = any_j(g_ij != 0) of
    docs/reference/algorithms.md#lazy-updates:

    * ``"dense"``: plain Adam;
    * ``"masked"`` (bojone's lazy): moments of every row updated, the parameter delta of absent
      rows dropped;
    * ``"frozen"`` (standard lazy): moments and parameters of absent rows left as they were,
      bias correction with the global step t.

    Absent rows are selected with np.where, never multiplied by the mask. Returns the θ history.
    """
    theta = np.asarray(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    history = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        present = np.any(g != 0, axis=-1, keepdims=True)
        new_m = beta1 * m + (1 - beta1) * g
        new_v = beta2 * v + (1 - beta2) * g * g
        if variant == "frozen":
            new_m = np.where(present, new_m, m)
            new_v = np.where(present, new_v, v)
        m, v = new_m, new_v
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = -lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
        theta = theta + delta if variant == "dense" else np.where(present, theta + delta, theta)
        history.append(theta.copy())
    return history


def _rms(x):
    return np.sqrt(np.mean(np.square(x))) if np.size(x) else 0.0


def adafactor_axes(shape, *, factored_dims="two_largest", min_dim=128):
    """docs/reference/algorithms.md#adafactor-rule code specifics: the two largest dims (ties: the
    later axis counts as larger), not factored below ``min_dim``; or torch/transformers' last two
    dims with no threshold."""
    if len(shape) < 2:
        return None
    if factored_dims == "last_two":
        return len(shape) - 1, len(shape) - 2
    order = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
    if shape[order[-2]] < min_dim:
        return None
    return order[-1], order[-2]


def adafactor_run(
    theta,
    grads,
    *,
    lr=1e-3,
    relative_step=False,
    lr_multipliers=None,
    beta1=0.0,
    decay_rate=0.8,
    beta2=None,
    eps1=1e-30,
    eps2=1e-3,
    clip=1.0,
    scale=True,
    wd=0.0,
    factored_dims="two_largest",
    min_dim=128,
    momentum_mode="unit",
):
    """docs/reference/algorithms.md#adafactor-rule in the blog's form with *sums* (the code uses
    means; the v̂ is the same), float64. ``lr_multipliers[t-1]`` scales lr at step t (an LR
    scheduler). Returns θ after each step."""
    theta = np.array(theta, dtype=np.float64)
    axes = adafactor_axes(theta.shape, factored_dims=factored_dims, min_dim=min_dim)
    v_row = v_col = v_full = 0.0
    m = np.zeros_like(theta)
    history = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        b2 = beta2 if beta2 is not None else 1.0 - t ** (-decay_rate)
        sq = g**2 + eps1
        if axes is not None:
            largest, second = axes
            # v_r[i] = EMA of Σ_j (g² + ε1) over the largest axis, v_c[j] over the second;
            # v̂ = v_r v_c / Σ_j v_c[j]  (the rank-1 I-divergence fit,
            # docs/reference/algorithms.md#adafactor-rule).
            v_row = b2 * v_row + (1 - b2) * sq.sum(axis=largest, keepdims=True)
            v_col = b2 * v_col + (1 - b2) * sq.sum(axis=second, keepdims=True)
            v_hat = v_row * v_col / v_col.sum(axis=largest, keepdims=True)
        else:
            v_full = b2 * v_full + (1 - b2) * sq
            v_hat = v_full
        u = g / np.sqrt(v_hat)
        if clip is not None:
            u = u / max(1.0, _rms(u) / clip)
        alpha = lr * (1.0 if lr_multipliers is None else lr_multipliers[t - 1])
        if relative_step:
            alpha *= min(1e-2, 1 / np.sqrt(t)) * (1.0 if scale else 0.05)
        s = max(eps2, _rms(theta)) if scale else 1.0
        if beta1 > 0 and momentum_mode == "unit":
            m = beta1 * m + (1 - beta1) * u
            u = m
        step = alpha * s * u
        if beta1 > 0 and momentum_mode == "scaled":
            m = beta1 * m + (1 - beta1) * step
            step = m
        theta = theta - alpha * wd * theta - step
        history.append(theta.copy())
    return history


def adax_run(theta, grads, *, lr, beta1, beta2, eps, eps_inside_sqrt=False, wd=0.0):
    """docs/reference/algorithms.md#adax-rule in the blog's *unnormalised* form v_t = (1+β2)v + β2
    g², v̂ = v/((1+β2)^t−1), float64. Returns θ after each step (and the final m, v̂)."""
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    history = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        m = beta1 * m + (1 - beta1) * g
        v = (1 + beta2) * v + beta2 * g**2
        v_hat = v / ((1 + beta2) ** t - 1)
        denom = np.sqrt(v_hat + eps) if eps_inside_sqrt else np.sqrt(v_hat) + eps
        theta = theta - lr * (m / denom + wd * theta)
        history.append(theta.copy())
    return history, m, v_hat


def amos_run(
    theta,
    grads,
    *,
    xi,
    eta,
    slot_shape,
    beta=0.999,
    zeta=0.25,
    fr=1.0,
    init_b=0.0,
    center=0.0,
    momentum=0.0,
    clip=None,
    eps=2.0**-125,
):
    """docs/reference/algorithms.md#amos-optimizer (jestimator's scale_by_amos) literally, float64,
    with v and b of ``slot_shape``. Returns θ after each step (and the final v, b)."""
    theta = np.array(theta, dtype=np.float64)
    v = np.zeros(slot_shape)
    b = np.full(slot_shape, float(init_b))
    mom = np.zeros_like(theta)
    history = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        if clip is not None:
            g = np.clip(g, -clip, clip)
        if len(slot_shape) == 0:
            g2 = np.mean(g**2)
        else:
            reduced = tuple(i for i, k in enumerate(g.shape) if slot_shape[i] < k)
            g2 = np.mean(g**2, axis=reduced, keepdims=True) if reduced else g**2
        v = beta * v + (1 - beta) * g2
        rcpl_v_hat = (1 - beta**t) / np.maximum(v, eps)
        c = (1 + zeta * np.sqrt(xi) * b) ** -0.5
        d = 1 / (1 + zeta * np.sqrt(xi * eta) * b)
        gamma = np.sqrt(fr) * c * xi**2 * g2 * rcpl_v_hat
        delta = fr * d * (-xi * eta * np.sqrt(rcpl_v_hat) * g - 0.5 * gamma * (theta - center))
        b = b + gamma * (fr + b)
        if momentum > 0:
            mom = momentum * mom + (1 - momentum) * delta
            delta = mom
        theta = theta + delta
        history.append(theta.copy())
    return history, v, b


# ----------------------------------------------------------------------------------------------
# LoRA-GA and LoRA-Pro, docs/reference/algorithms.md#lora. PEFT naming for LoRA-GA (W = W0 + s·B_p
# A_p); LoRA-Pro is written in the blog's notation (W = W0 + A B, A n×r left, B r×m right) and
# mapped to PEFT's.


def svd_signed(G):
    """SVD with the sign convention danlu documents: the largest-magnitude entry of each left
    singular vector is positive."""
    U, S, Vh = np.linalg.svd(np.asarray(G, dtype=np.float64), full_matrices=False)
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, S, Vh * signs[:, None]


def lora_ga_factors(G, r, *, direction, scale, lora_scale, gamma=16.0):
    """docs/reference/algorithms.md#lora-ga-code (and PEERS.md for the PEFT variant). Returns
    (lora_A, lora_B)."""
    U, S, Vh = svd_signed(G)
    if direction == "ArB2r":
        A, B, s_b = Vh[:r], U[:, r : 2 * r], S[r : 2 * r]
    elif direction == "A2rBr":
        A, B, s_b = Vh[r : 2 * r], U[:, :r], S[:r]
    else:  # ArBr
        A, B, s_b = Vh[1 : 2 * r : 2], U[:, 0 : 2 * r : 2], S[0 : 2 * r : 2]
    c = G.shape[0] ** 0.25 / np.sqrt(gamma)
    if scale.startswith("peft_"):
        B = B @ np.diag(s_b)
        if scale == "peft_stable":
            return A, B * c
        scale = scale[len("peft_") :]
    if scale == "stable":
        return A * c, B * c
    if scale == "gd":
        return A / lora_scale, B / lora_scale
    return A, B


def lora_pro_blog(G, A, B, choice):
    """docs/reference/algorithms.md#lora-pro-rule, blog notation, s = 1. Returns (H_A, H_B) for the
    C chosen by ``choice``: "sylvester" (AᵀA C + C BBᵀ = −Aᵀ G_A (BBᵀ)^{-1}, solved with SciPy's
    Bartels–Stewart), "symmetric" (C = −½(AᵀA)^{-1} G_B Bᵀ(BBᵀ)^{-1}), "c_zero" (C = 0, the blog's),
    or "zero_paper" (the C that is X = 0 in the paper's form: matching ĝ_A = H_B term by term gives
    X = −C − (AᵀA)^{-1} G_B Bᵀ (BBᵀ)^{-1}, so C = −(AᵀA)^{-1} G_B Bᵀ (BBᵀ)^{-1})."""
    from scipy.linalg import solve_sylvester

    G, A, B = (np.asarray(x, dtype=np.float64) for x in (G, A, B))
    GA, GB = G @ B.T, A.T @ G
    AtA_inv, BBt_inv = np.linalg.inv(A.T @ A), np.linalg.inv(B @ B.T)
    if choice == "sylvester":
        C = solve_sylvester(A.T @ A, B @ B.T, -A.T @ GA @ BBt_inv)
    elif choice == "symmetric":
        C = -0.5 * AtA_inv @ GB @ B.T @ BBt_inv
    elif choice == "zero_paper":
        C = -AtA_inv @ GB @ B.T @ BBt_inv
    else:
        C = np.zeros((A.shape[1], A.shape[1]))
    m = B.shape[1]
    H_A = GA @ BBt_inv + A @ C
    H_B = AtA_inv @ GB @ (np.eye(m) - B.T @ BBt_inv @ B) - C @ B
    return H_A, H_B


def lora_pro_c_by_least_squares(G, A, B):
    """min_C ‖H_A − G_A‖² + ‖H_B − G_B‖² solved directly (vec/Kronecker + lstsq), from the
    objective's definition, without the Sylvester equation. Column-major vec:
    vec(A C) = (I ⊗ A) vec(C), vec(C B) = (Bᵀ ⊗ I) vec(C)."""
    G, A, B = (np.asarray(x, dtype=np.float64) for x in (G, A, B))
    r, m = A.shape[1], B.shape[1]
    GA, GB = G @ B.T, A.T @ G
    base_A = GA @ np.linalg.inv(B @ B.T) - GA
    base_B = np.linalg.inv(A.T @ A) @ GB @ (np.eye(m) - B.T @ np.linalg.inv(B @ B.T) @ B) - GB
    M = np.vstack([np.kron(np.eye(r), A), -np.kron(B.T, np.eye(r))])
    rhs = -np.concatenate([base_A.flatten(order="F"), base_B.flatten(order="F")])
    c = np.linalg.lstsq(M, rhs, rcond=None)[0]
    return c.reshape((r, r), order="F")


def lora_pro_paper_from_blog(G, lora_A, lora_B, s, choice):
    """PEFT-named adjusted gradients from the blog form: blog A = lora_B, blog B = lora_A; for
    a fixed full gradient G every adjusted gradient scales by 1/s
    (docs/reference/algorithms.md#lora-pro-tests), so ĝ_A = H_B / s and ĝ_B = H_A / s."""
    H_A, H_B = lora_pro_blog(G, lora_B, lora_A, choice)
    return H_B / s, H_A / s


def lora_pro_full_adam(W0, A, B, grad_fn, steps, *, s, lr, betas, eps, wd, choice):
    """LoRA-Pro's full mode, docs/reference/algorithms.md#lora-pro "With Adam": ``steps`` steps
    where ``grad_fn(W)`` is the full-weight gradient at W = W0 + s·B A. Returns (W0, A, B)."""
    W0, A, B = (np.asarray(x, dtype=np.float64).copy() for x in (W0, A, B))
    m = np.zeros_like(W0)
    v = np.zeros_like(W0)
    beta1, beta2 = betas
    for t in range(1, steps + 1):
        G = np.asarray(grad_fn(W0 + s * B @ A), dtype=np.float64)
        gA, gB = lora_pro_paper_from_blog(G, A, B, s, "c_zero")
        G_eq = s * (B @ gA + gB @ A)  # X-free: any C gives the same reconstruction
        m = beta1 * m + (1 - beta1) * G_eq
        v = beta2 * v + (1 - beta2) * G_eq**2
        U = (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
        # (U_A, U_B) = (s BᵀU, s U Aᵀ) are the LoRA gradients of a "full gradient" U.
        dA, dB = lora_pro_paper_from_blog(U, A, B, s, choice)
        keep = np.sqrt(1 - lr * wd)
        A, B = keep * A - lr * dA, keep * B - lr * dB
        W0 = (1 - lr * wd) * W0
    return W0, A, B


def adamw_step(p, m, v, g, t, *, lr, betas, eps, wd):
    """One step of torch.optim.AdamW's rule (decoupled decay p·(1 − lr·wd)), float64, 1-based
    t. Returns (p, m, v)."""
    p, m, v, g = (np.asarray(x, dtype=np.float64) for x in (p, m, v, g))
    p = p * (1 - lr * wd)
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g**2
    p = p - lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return p, m, v
