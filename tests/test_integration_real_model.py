"""A real model end to end: a tiny randomly initialised transformers Llama in bf16, trained by the
Hugging Face ``Trainer`` with every registered optimizer, checkpointed and resumed; and LoRA-GA on
PEFT through the ``Trainer``, saved with ``save_lora_ga_adapter`` and resumed. Offline, on CPU.

tests/test_integration_hf_trainer.py covers the ``Trainer``'s two ways of taking an optimizer in
fp32 against a plain loop; this file covers bf16 parameters (stochastic rounding on, drawn from
torch's global generator, which the ``Trainer``'s checkpoints save), ``resume_from_checkpoint``
and PEFT adapters on a shifted base.
"""

import os
import shutil

import pytest
import tiny_models
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


from optimizer_cases import CASES  # noqa: E402

import danlu  # noqa: E402
from danlu.core.precision import rounds_stochastically  # noqa: E402

VOCAB, SEQ, DATA, MICRO = 32, 8, 8, 4  # 2 steps per epoch, so a resume skips data too
STEPS, SAVE_AT = 6, 3

# A learning rate per registered optimizer (tuned; a new one gets a default below). Tiger's,
# AdaFactor's and Amos's lr is relative to the parameters' RMS (≈0.02 at init).
LRS = {"adafactor": 0.1, "adamw": 1e-2, "adax": 1e-2, "amos": 0.1, "lion": 3e-3, "tiger": 0.1}
# a registered optimizer not listed: its conformance lr (tests/optimizer_cases.py)
LRS |= {n: CASES[n]["kwargs"]["lr"] for n in danlu.REGISTRY if n not in LRS}


@pytest.fixture(autouse=True)
def quiet():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def tiny_llama():
    """The same bf16 weights on every call."""
    return tiny_models.tiny_llama(VOCAB, positions=SEQ, dtype=torch.bfloat16)


class Sequences(torch.utils.data.Dataset):
    """Learnable sequences: the next token is the token + 1 (mod VOCAB)."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        start = torch.randint(0, VOCAB, (DATA, 1), generator=gen)
        self.ids = (start + torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return DATA

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(model, opt, out, steps=STEPS, save_at=SAVE_AT):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=MICRO,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_at,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=Sequences(), optimizers=(opt, None)
    )


def losses(t):
    return [entry["loss"] for entry in t.state.log_history if "loss" in entry]


def assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def differs(a, b):
    return any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def train_and_checkpoint(name, out):
    model = tiny_llama()
    opt = danlu.create_optimizer(name, model, lr=LRS[name])
    t = trainer(model, opt, out)
    t.train()
    return model, t


def resume(name, checkpoint, out):
    model = tiny_llama()
    opt = danlu.create_optimizer(name, model, lr=LRS[name])
    t = trainer(model, opt, out)
    t.train(resume_from_checkpoint=str(checkpoint))
    return model, t


def test_every_registered_optimizer_has_a_case():
    assert sorted(LRS) == sorted(danlu.REGISTRY)


@pytest.mark.parametrize("name", sorted(LRS))
def test_bf16_training_and_resume_from_checkpoint(tmp_path, name):
    before = [p.detach().clone() for p in tiny_llama().parameters()]
    model, t = train_and_checkpoint(name, tmp_path / "run")
    assert rounds_stochastically(None, torch.bfloat16)  # the default for bf16 parameters
    assert type(getattr(t.optimizer, "optimizer", t.optimizer)) is danlu.REGISTRY[name].cls
    logged = losses(t)
    assert len(logged) == STEPS and logged[-1] < logged[0], logged
    for (pname, p), p0 in zip(model.named_parameters(), before, strict=True):
        assert p.dtype == torch.bfloat16, pname
        assert torch.isfinite(p).all(), pname
        assert not torch.equal(p, p0), f"{pname} did not move"

    # Resume from the step-3 checkpoint in a fresh model and optimizer: bit for bit the same
    # parameters and losses as the uninterrupted run (the optimizer state, the schedule, the
    # data order and the RNG that stochastic rounding draws from all come back).
    resumed, t2 = resume(name, tmp_path / "run" / f"checkpoint-{SAVE_AT}", tmp_path / "resumed")
    assert losses(t2) == logged  # the checkpoint's log, then the same losses after it
    assert_same_params(model, resumed)


def test_resume_check_can_fail(tmp_path):
    """The comparison above has teeth: without the optimizer state, or without the RNG state
    (stochastic rounding then draws other noise), the resumed run differs."""
    model, _ = train_and_checkpoint("tiger", tmp_path / "run")
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    for missing in ("optimizer.pt", "rng_state.pth"):
        broken = tmp_path / f"without-{missing}"
        shutil.copytree(checkpoint, broken)
        os.remove(broken / missing)
        resumed, _ = resume("tiger", broken, tmp_path / f"resumed-{missing}")
        assert differs(model, resumed), missing


# -- LoRA-GA on PEFT through the Trainer ------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def lora_ga_model():
    """A PEFT LoRA model on the bf16 base (PEFT keeps the adapters in fp32), initialised by
    LoRA-GA on the training data: deterministic, so a new process can rebuild it."""
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    )
    ids = Sequences().ids
    batches = [{"input_ids": ids[i : i + MICRO], "labels": ids[i : i + MICRO]} for i in (0, 4)]
    danlu.lora.lora_ga_init_(model, batches, lambda m, batch: m(**batch).loss)
    return model


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=Sequences().ids).logits.float()


def test_lora_ga_peft_trainer_save_reload_and_resume(tmp_path):
    model = lora_ga_model()
    shifted = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(shifted, tiny_llama().model.layers[0].self_attn.q_proj.weight)
    t = trainer(model, danlu.lora.LoRAPro(model, lr=5e-2), tmp_path / "run", steps=4, save_at=2)
    t.train()
    logged = losses(t)
    assert logged[-1] < logged[0], logged
    expected = logits(model)

    # Saved with the helper, the adapter reloads onto the ORIGINAL bf16 base model; saved
    # plainly (which is what a Trainer checkpoint holds), it does not.
    danlu.lora.save_lora_ga_adapter(model, tmp_path / "ga")
    model.save_pretrained(tmp_path / "plain")
    ga_error = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ga")) - expected
    plain = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
    plain_error = (logits(plain) - expected).abs().max()
    # what remains is the bf16 rounding of the shifted base weights at initialisation
    assert ga_error.abs().max() < 1e-2 and plain_error > 10 * ga_error.abs().max()

    # Resuming in a new process: rebuild, run lora_ga_init_ again (deterministic), then resume
    # from the Trainer's checkpoint: bit for bit the uninterrupted run.
    rebuilt = lora_ga_model()
    t2 = trainer(rebuilt, danlu.lora.LoRAPro(rebuilt, lr=5e-2), tmp_path / "resumed", 4, 2)
    t2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert losses(t2) == logged
    assert_same_params(model, rebuilt)
    torch.testing.assert_close(logits(rebuilt), expected, rtol=0, atol=0)
