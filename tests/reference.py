"""Independent NumPy float64 re-implementations of the algorithms, written from SPEC.md.

These never call danlu; tests compare danlu against them.
"""

from __future__ import annotations

import numpy as np


def lion_step(theta, m, g, *, lr, beta1, beta2, wd):
    """SPEC §1(a). Returns (theta, m)."""
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
    """SPEC §2(a), k = 1, written as the reference code: u = (sign(m) + d·θ)·η."""
    theta, m, g = (np.asarray(x, dtype=np.float64) for x in (theta, m, g))
    if kind == "elementwise":
        wd = 0.0
    new_m = beta * m + (1 - beta) * g
    eta = tiger_eta(theta, lr=lr, kind=kind, rms_floor=rms_floor)
    new_theta = theta - eta * (np.sign(new_m) + wd * theta)
    return new_theta, new_m


def tiger_accumulated(theta, micro_grads, *, k, lr, beta, wd, kind, rms_floor=0.0):
    """SPEC §2(a)/§3(a) literally, 1-based t: decay at the first micro-step of each window,
    add (1-β)g/k every micro-step, update when k | t. Returns the (θ, m) history per micro-step."""
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
# LoRA-GA and LoRA-Pro, SPEC §10. PEFT naming for LoRA-GA (W = W0 + s·B_p A_p); LoRA-Pro is
# written in the blog's notation (W = W0 + A B, A n×r left, B r×m right) and mapped to PEFT's.


def svd_signed(G):
    """SVD with the sign convention danlu documents: the largest-magnitude entry of each left
    singular vector is positive."""
    U, S, Vh = np.linalg.svd(np.asarray(G, dtype=np.float64), full_matrices=False)
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, S, Vh * signs[:, None]


def lora_ga_factors(G, r, *, direction, scale, lora_scale, gamma=16.0):
    """SPEC §10.1(b) (and PEERS.md for the PEFT variant). Returns (lora_A, lora_B)."""
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
    """SPEC §10.2(a), blog notation, s = 1. Returns (H_A, H_B) for the C chosen by ``choice``:
    "sylvester" (AᵀA C + C BBᵀ = −Aᵀ G_A (BBᵀ)^{-1}, solved with SciPy's Bartels–Stewart),
    "symmetric" (C = −½(AᵀA)^{-1} G_B Bᵀ(BBᵀ)^{-1}), "c_zero" (C = 0, the blog's), or
    "zero_paper" (the C that is X = 0 in the paper's form: matching ĝ_A = H_B term by term gives
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
    a fixed full gradient G every adjusted gradient scales by 1/s (SPEC §10.2(e)), so
    ĝ_A = H_B / s and ĝ_B = H_A / s."""
    H_A, H_B = lora_pro_blog(G, lora_B, lora_A, choice)
    return H_B / s, H_A / s


def lora_pro_full_adam(W0, A, B, grad_fn, steps, *, s, lr, betas, eps, wd, choice):
    """LoRA-Pro's full mode, SPEC §10.2 "With Adam": ``steps`` steps where ``grad_fn(W)`` is
    the full-weight gradient at W = W0 + s·B A. Returns (W0, A, B)."""
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
