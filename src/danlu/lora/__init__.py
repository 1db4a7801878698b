"""LoRA-GA initialisation and LoRA-Pro gradient adjustment, docs/reference/algorithms.md#lora.

PEFT naming throughout (docs/reference/algorithms.md#conventions):
``W = W0 + scale · lora_B @ lora_A`` with ``lora_A`` (r×in) and ``lora_B`` (out×r). Every function
that takes a model accepts danlu's :class:`LoRALinear` layers (see :func:`inject`) and PEFT
``LoraModel`` / ``PeftModel`` alike.

Typical use::

    danlu.lora.inject(model, target=["q_proj", "v_proj"], rank=8, alpha=16)
    danlu.lora.lora_ga_init_(model, batches, lambda m, b: m(**b).loss)
    opt = danlu.lora.LoRAPro(model, lr=2e-4)
"""

from danlu.lora.ga import (
    LoRADelta,
    LoRAGAInfo,
    average_gradients,
    export_lora_delta,
    lora_ga_init_,
)
from danlu.lora.layers import (
    LoRAAdapter,
    LoRALinear,
    LoRATriple,
    find_lora_adapters,
    inject,
    lora_triples,
)
from danlu.lora.pro import LoRAPro, LoRAProAdam, lora_pro_gradients
from danlu.lora.save import save_lora_ga_adapter

__all__ = [
    "LoRAAdapter",
    "LoRADelta",
    "LoRAGAInfo",
    "LoRALinear",
    "LoRAPro",
    "LoRAProAdam",
    "LoRATriple",
    "average_gradients",
    "export_lora_delta",
    "find_lora_adapters",
    "inject",
    "lora_ga_init_",
    "lora_pro_gradients",
    "lora_triples",
    "save_lora_ga_adapter",
]
