"""A tiny random-init transformers LLaMA for the tests that train a real model (no downloads)."""

import torch


def tiny_llama(
    vocab: int,
    *,
    hidden: int = 16,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 2,
    positions: int = 16,
    dtype: torch.dtype = torch.float32,
    **config,
) -> torch.nn.Module:
    """``LlamaForCausalLM`` with an MLP twice ``hidden`` wide; the same weights on every call
    (seed 0); ``config`` adds or overrides ``LlamaConfig`` fields."""
    import transformers

    torch.manual_seed(0)
    llama_config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        **config,
    )
    return transformers.LlamaForCausalLM(llama_config).to(dtype)
