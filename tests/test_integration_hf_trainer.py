"""Hugging Face ``Trainer`` with danlu optimizers, offline, on a tiny randomly initialised Llama:
``optimizers=(opt, scheduler)`` and ``optimizer_cls_and_kwargs``."""

import copy

import pytest
import tiny_models
import torch
import transformers

import danlu

VOCAB, SEQ, BATCH, STEPS = 32, 8, 8, 12


def tiny_llama():
    return tiny_models.tiny_llama(VOCAB, positions=SEQ, attention_dropout=0.0)


class Batches(torch.utils.data.Dataset):
    """BATCH sequences: with the batch size equal to the data set, every step sees all of it."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
        self.ids = (start + torch.arange(SEQ)) % VOCAB  # learnable: next token = token + 1

    def __len__(self):
        return BATCH

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        max_grad_norm=0.0,  # no clipping, so a plain loop can reproduce the run
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


def inner(optimizer):
    """The optimizer accelerate wrapped for the Trainer."""
    return getattr(optimizer, "optimizer", optimizer)


def full_batch():
    data = Batches()
    return {key: torch.stack([item[key] for item in data]) for key in ("input_ids", "labels")}


def test_trainer_with_optimizers_tuple_matches_a_plain_loop(tmp_path):
    model = tiny_llama()
    reference = copy.deepcopy(model)

    opt = danlu.Tiger(danlu.param_groups(model, weight_decay=0.01), lr=0.3)
    sched = danlu.schedules.PiecewiseLinearLR(opt, {3: 1.0, STEPS: 0.1})
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path), train_dataset=Batches(), optimizers=(opt, sched)
    )
    result = trainer.train()
    assert inner(trainer.optimizer) is opt
    assert trainer.lr_scheduler is sched

    # the same steps by hand: backward, step, scheduler step, zero_grad
    ref_opt = danlu.Tiger(danlu.param_groups(reference, weight_decay=0.01), lr=0.3)
    ref_sched = danlu.schedules.PiecewiseLinearLR(ref_opt, {3: 1.0, STEPS: 0.1})
    batch = full_batch()
    losses = []
    for _ in range(STEPS):
        loss = reference(**batch).loss
        loss.backward()
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
        losses.append(loss.item())
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-4)
    assert result.training_loss == pytest.approx(sum(losses) / STEPS, rel=1e-4)
    assert losses[-1] < 0.8 * losses[0]
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


# Tiger's and AdaFactor's lr is relative to RMS(θ) (≈0.02 at init), Lion's is absolute.
LRS = {"lion": 1e-2, "tiger": 0.3, "adafactor": 0.3}


@pytest.mark.parametrize("name", sorted(LRS))
def test_trainer_with_optimizer_cls_and_kwargs(tmp_path, name):
    model = tiny_llama()
    cls = danlu.REGISTRY[name].cls
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, weight_decay=0.05, learning_rate=1e-2),
        train_dataset=Batches(),
        optimizer_cls_and_kwargs=(cls, {"lr": LRS[name]}),
    )
    trainer.train()
    opt = inner(trainer.optimizer)
    assert type(opt) is cls
    # the Trainer's own split: decay for the matrices, none for the norms (and biases)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for pname, p in model.named_parameters():
        expected = 0.0 if "norm" in pname else 0.05
        assert decay[id(p)] == expected, pname
    assert all(p in opt.state and opt.state[p] for p in model.parameters())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0]
    # the Trainer's default linear schedule drove the optimizer's lr to 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_trainer_with_danlu_param_groups_through_kwargs(tmp_path):
    """``params`` in the kwargs replaces the Trainer's groups: Tiger gets its kind tags."""
    model = tiny_llama()
    kwargs = {"params": danlu.param_groups(model, weight_decay=0.01), "lr": 0.3}
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=Batches(),
        optimizer_cls_and_kwargs=(danlu.Tiger, kwargs),
    )
    trainer.train()
    opt = inner(trainer.optimizer)
    kinds = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert kinds["model.embed_tokens.weight"] == "embedding"
    assert kinds["model.norm.weight"] == "elementwise"
    assert kinds["lm_head.weight"] == "matrix"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0]
