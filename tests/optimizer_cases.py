"""Per-optimizer settings for the shared conformance suite (tests/test_conformance.py).

Every registry entry must have a case here: its keyword arguments for the small test problems
and the hyper-parameter values that must raise ValueError (argument name, bad value).
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
}
