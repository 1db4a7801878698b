"""danlu.lora.save_lora_ga_adapter: a LoRA-GA PEFT model saved as an ordinary PEFT adapter that
reloads onto the ORIGINAL base model (plain ``save_pretrained`` does not: LoRA-GA shifted the
base weights, which PEFT does not save). Tiny random transformers Llama, offline."""

import copy
import json

import pytest
import tiny_models
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import danlu  # noqa: E402
from danlu.lora import (  # noqa: E402
    export_lora_delta,
    find_lora_adapters,
    lora_ga_init_,
    save_lora_ga_adapter,
)

VOCAB = 32
TARGETS = ["q_proj", "v_proj", "down_proj"]


def base_model(dtype=torch.float32):
    """The same random weights on every call (the 'original base model' of a reload)."""
    return tiny_models.tiny_llama(VOCAB, layers=2, dtype=dtype)


def batches(count=3):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def loss_fn(model, batch):
    return model(**batch).loss


def ga_model(dtype=torch.float32, adapter_name="default", **lora):
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": TARGETS, **lora}
    model = peft.get_peft_model(
        base_model(dtype), peft.LoraConfig(**cfg), adapter_name=adapter_name
    )
    lora_ga_init_(model, batches(), loss_fn)
    return model


def train(model, steps=4, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = danlu.AdamW(params, lr=lr, weight_decay=0.0)
    data = batches()
    for i in range(steps):
        loss_fn(model, data[i % len(data)]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=batches(4)[3]["input_ids"]).logits.float()


def reload(path, dtype=torch.float32):
    return peft.PeftModel.from_pretrained(base_model(dtype), str(path)).eval()


def base_weights(model):
    """{PEFT module name: base weight (out, in) in float64} of the LoRA layers."""
    return {a.name: a.base_weight.detach().double().clone() for a in find_lora_adapters(model)}


def test_plain_save_pretrained_is_wrong_and_the_helper_is_right(tmp_path):
    original = base_weights(
        peft.get_peft_model(
            base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
        )
    )
    model = train(ga_model())
    shifted = base_weights(model)
    # the premise: LoRA-GA moved the frozen base weights (PEFT does not save them)
    assert max((shifted[k] - original[k]).abs().max() for k in original) > 1e-3
    expected = logits(model)

    model.save_pretrained(tmp_path / "plain")
    plain_error = (logits(reload(tmp_path / "plain")) - expected).abs().max()
    assert plain_error > 1e-2  # the silent wrong result the helper exists for

    save_lora_ga_adapter(model, tmp_path / "ga")
    reloaded = reload(tmp_path / "ga")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)

    config = json.loads((tmp_path / "ga" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
    # the live model is unchanged: config, adapter rank, outputs
    assert model.peft_config["default"].r == 2 and model.peft_config["default"].lora_alpha == 4
    assert all(a.rank == 2 for a in find_lora_adapters(model))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_saved_delta_is_the_change_against_the_original_weights(tmp_path):
    """Oracle from the weights alone (float64): the saved adapter's s'·B'A' must equal
    (shifted W0 + s·BA) − original W0 for every layer."""
    fresh = peft.get_peft_model(
        base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    )
    original = base_weights(fresh)
    model = train(ga_model())
    save_lora_ga_adapter(model, tmp_path)
    saved = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapters = find_lora_adapters(model)
    assert len(adapters) == 2 * len(TARGETS)
    for a in adapters:
        effective = a.base_weight.double() + a.scale * a.lora_B.double() @ a.lora_A.double()
        oracle = effective.detach() - original[a.name]
        A, B = saved[f"{a.name}.lora_A.weight"], saved[f"{a.name}.lora_B.weight"]
        assert A.shape == (4, a.in_features) and B.shape == (a.out_features, 4)
        torch.testing.assert_close(scale * B.double() @ A.double(), oracle, rtol=0, atol=1e-6)
        assert oracle.abs().max() > 1e-3


def test_bf16_base(tmp_path):
    """A bf16 base (PEFT keeps the adapters in fp32): the reloaded model differs from the
    trained one only by the one bf16 rounding of the shifted W0, far less than plain saving."""
    model = train(ga_model(torch.bfloat16))
    assert all(a.base_weight.dtype == torch.bfloat16 for a in find_lora_adapters(model))
    expected = logits(model)
    model.save_pretrained(tmp_path / "plain")
    plain_error = float((logits(reload(tmp_path / "plain", torch.bfloat16)) - expected).abs().max())
    save_lora_ga_adapter(model, tmp_path / "ga")
    error = float((logits(reload(tmp_path / "ga", torch.bfloat16)) - expected).abs().max())
    assert error < 1e-2 and plain_error > 10 * error, (error, plain_error)


def test_rslora_rank_and_alpha_patterns_keep_each_scale(tmp_path):
    """PEFT's own conversion doubles alpha_pattern even with rsLoRA (scale off by √2); here every
    layer keeps its scale: rank ×2, alpha ×√2."""
    model = train(
        ga_model(use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 3.0})
    )
    expected = logits(model)
    save_lora_ga_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 8}
    assert config["alpha_pattern"]["v_proj"] == pytest.approx(3.0 * 2**0.5)
    reloaded = reload(tmp_path)
    for a, b in zip(find_lora_adapters(model), find_lora_adapters(reloaded), strict=True):
        assert b.rank == 2 * a.rank and b.scale == pytest.approx(a.scale, rel=1e-12)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


def test_named_adapter_embedding_lora_and_a_changed_scale(tmp_path):
    """A non-default adapter name (saved under its own folder), an embedding LoRA that LoRA-GA
    does not touch (zero-padded to the new rank) and a scale changed after training."""
    model = ga_model(adapter_name="ga", target_modules=[*TARGETS, "embed_tokens"])
    train(model)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and not isinstance(
            module, peft.tuners.lora.Embedding
        ):
            module.set_scale("ga", 0.5)
    expected = logits(model)
    embedding_B = model.base_model.model.model.embed_tokens.lora_embedding_B["ga"]
    assert embedding_B.abs().max() > 0  # trained, so the embedding adapter matters
    save_lora_ga_adapter(model, tmp_path, adapter_name="ga")
    reloaded = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "ga"), adapter_name="ga")
    torch.testing.assert_close(logits(reloaded.eval()), expected, rtol=0, atol=1e-5)


def test_second_init_after_training_saves_the_whole_shift(tmp_path):
    """lora_ga_init_ again after training folds the trained adapter into W0: the base then
    carries a rank-3r shift (first init, minus the trained adapter, plus the new init) and the
    saved adapter has rank r + 3r; a second call with no training between cancels exactly and
    the saved adapter stays at rank 2r."""
    model = ga_model()
    lora_ga_init_(model, batches(), loss_fn, direction="A2rBr")  # no training between
    save_lora_ga_adapter(model, tmp_path / "twice")
    assert json.loads((tmp_path / "twice" / "adapter_config.json").read_text())["r"] == 4

    train(model)
    model.train()
    lora_ga_init_(model, batches(), loss_fn)
    train(model)
    expected = logits(model)
    save_lora_ga_adapter(model, tmp_path / "after")
    config = json.loads((tmp_path / "after" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    torch.testing.assert_close(logits(reload(tmp_path / "after")), expected, rtol=0, atol=1e-5)


def test_export_lora_delta_after_a_scale_change():
    fresh = peft.get_peft_model(
        base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    )
    original = base_weights(fresh)
    model = train(ga_model())
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_scale("default", 0.25)
    deltas = export_lora_delta(model)
    for a in find_lora_adapters(model):
        effective = a.base_weight.double() + a.scale * a.lora_B.double() @ a.lora_A.double()
        torch.testing.assert_close(
            deltas[a.name].weight().double(),
            effective.detach() - original[a.name],
            rtol=0,
            atol=1e-6,
        )


def test_errors(tmp_path):
    plain = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"not initialised by danlu\.lora\.lora_ga_init_"):
        save_lora_ga_adapter(plain, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

    model = ga_model()
    with pytest.raises(ValueError, match="adapter_name must be one of"):
        save_lora_ga_adapter(model, tmp_path, adapter_name="other")
    with pytest.raises(ValueError, match="state_dict is set by save_lora_ga_adapter"):
        save_lora_ga_adapter(model, tmp_path, state_dict={})
    with pytest.raises(ValueError, match=r"must be a peft\.PeftModel"):
        save_lora_ga_adapter(model.base_model, tmp_path)

    ours = base_model()
    danlu.lora.inject(ours, target=["q_proj"], rank=2)
    lora_ga_init_(ours, batches(), loss_fn)
    with pytest.raises(ValueError, match="export_lora_delta"):
        save_lora_ga_adapter(ours, tmp_path)

    dora = peft.get_peft_model(
        base_model(), peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=True)
    )
    with pytest.raises(ValueError, match="DoRA"):
        save_lora_ga_adapter(dora, tmp_path)
    assert not any(tmp_path.iterdir())


def test_record_follows_deepcopy(tmp_path):
    """The LoRA-GA record lives on the layer objects: a deep copy of the model saves the same."""
    model = train(ga_model())
    expected = logits(model)
    save_lora_ga_adapter(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(logits(reload(tmp_path)), expected, rtol=0, atol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores the base weight as (in, out) (PEFT's fan_in_fan_out): the saved
    adapter is in PEFT's usual orientation all the same."""

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2
        )
        return transformers.GPT2LMHeadModel(config)

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(gpt2(), config)
    lora_ga_init_(model, batches(), loss_fn)
    train(model)
    expected = logits(model)
    save_lora_ga_adapter(model, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(gpt2(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


def test_tied_lm_head_is_refused():
    """A Llama with tied input and output embeddings: LoRA-GA on lm_head would shift the
    embedding too (the logits moved by ~0.4 here before danlu refused it)."""
    base = tiny_models.tiny_llama(VOCAB, tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    before = logits(model.eval())
    with pytest.raises(ValueError, match=r"embed_tokens\.weight' \(tied weights\)"):
        lora_ga_init_(model, batches(), loss_fn)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
