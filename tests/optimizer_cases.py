"""Per-optimizer settings for the shared conformance suite (tests/test_conformance.py).

Every registry entry must have a case here: its keyword arguments for the small test problems
and the hyper-parameter values that must raise ValueError (argument name, bad value).
``float32_state`` names the state keys that are float32 by design whatever the parameter dtype
(statistics that underflow or stop moving in bf16); every other non-scalar state tensor must
have the parameter's dtype.
"""

CASES = {
    "adamw": {
        "kwargs": {"lr": 3e-2, "weight_decay": 0.01},
        "invalid": [
            ("lr", -1e-3),
            ("lr", float("inf")),
            ("betas", (1.0, 0.999)),
            ("betas", (0.9, -0.1)),
            ("betas", (0.9,)),
            ("eps", -1e-8),
            ("weight_decay", -0.1),
            ("grad_accum_steps", 0),
            ("grad_accum_steps", 1.5),
            ("eps_inside_sqrt", "yes"),
            ("maximize", "no"),
            ("foreach", "yes"),
        ],
        "invalid_group": [("lr", -1.0), ("eps", float("nan")), ("grad_accum_steps", 0)],
    },
    "lion": {
        "kwargs": {"lr": 3e-3, "weight_decay": 0.1},
        "invalid": [
            ("lr", -1e-3),
            ("lr", float("nan")),
            ("betas", (1.0, 0.99)),
            ("betas", (0.9, -0.1)),
            ("betas", (0.9,)),
            ("weight_decay", -0.1),
            ("foreach", "yes"),
            ("fused", 1),
            ("state_dtype", "bfloat16"),
            ("stochastic_rounding", None),
        ],
        "invalid_group": [("lr", -1.0), ("betas", (0.9, 1.5))],
    },
    "tiger": {
        "kwargs": {"lr": 2e-2, "weight_decay": 0.01},
        "invalid": [
            ("lr", -1e-3),
            ("beta", 1.0),
            ("beta", -0.5),
            ("weight_decay", -1.0),
            ("grad_accum_steps", 0),
            ("grad_accum_steps", 2.5),
            ("shrink_ratio", 0.0),
            ("shrink_ratio", 1.5),
            ("nonfinite", "ignore"),
            ("nonfinite_scope", "everything"),
            ("rms_floor", -1e-3),
            ("maximize", "no"),
            ("state_dtype", "bfloat16"),
        ],
        "invalid_group": [("kind", "conv"), ("center", float("nan")), ("beta", 2.0)],
    },
    "adafactor": {
        # min_dim_size_to_factor=4 factors TinyNet's 6-wide matrices (the head stays unfactored)
        # and beta1 > 0 exercises the momentum, so the suite covers every state layout.
        "kwargs": {"lr": 3e-2, "weight_decay": 0.01, "beta1": 0.9, "min_dim_size_to_factor": 4},
        "float32_state": ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"),
        "invalid": [
            ("lr", -1e-3),
            ("lr", float("nan")),
            ("beta1", 1.0),
            ("beta1", -0.1),
            ("decay_rate", 0.0),
            ("decay_rate", 1.0),
            ("beta2", 1.5),
            ("eps1", -1e-30),
            ("eps2", -1e-3),
            ("clip_threshold", 0.0),
            ("clip_threshold", -1.0),
            ("weight_decay", -0.1),
            ("relative_step", 1),
            ("multiply_by_parameter_scale", "yes"),
            ("factored_dims", "first_two"),
            ("min_dim_size_to_factor", -1),
            ("min_dim_size_to_factor", 1.5),
            ("momentum_mode", "fairseq"),
            ("foreach", "yes"),
        ],
        "invalid_group": [("decay_rate", 1.5), ("clip_threshold", 0.0), ("factored_dims", "rows")],
    },
    "adax": {
        "kwargs": {"lr": 1e-2, "weight_decay": 0.01},
        "float32_state": ("exp_avg_sq",),
        "invalid": [
            ("lr", -1e-3),
            ("betas", (1.0, 1e-4)),
            ("betas", (0.9, 0.0)),
            ("betas", (0.9, 1.0)),
            ("betas", (0.9,)),
            ("eps", -1e-6),
            ("weight_decay", -0.1),
            ("eps_inside_sqrt", "no"),
            ("maximize", 1),
        ],
        "invalid_group": [("betas", (0.9, -1e-4)), ("eps", -1.0)],
    },
    "amos": {
        "kwargs": {"lr": 0.1, "momentum": 0.5},
        "float32_state": ("exp_avg_sq", "b"),
        "invalid": [
            ("lr", -1e-3),
            ("eta", 0.0),
            ("eta", -0.5),
            ("eta", "large"),
            ("beta", 1.0),
            ("momentum", 1.0),
            ("momentum", -0.1),
            ("clip_value", 0.0),
            ("slots", "rows"),
            ("init_b", -1.0),
            ("finetune_rate", -0.5),
            ("zeta", -0.25),
            ("eps", 0.0),
        ],
        "invalid_group": [
            ("eta", 0.0),
            ("slots", "diagonal"),
            ("center", float("nan")),
            ("kind", "conv"),
        ],
    },
}
