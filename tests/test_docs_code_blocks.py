"""Every ```python block of README.md and docs/**/*.md runs, so a recipe cannot rot.

The blocks of a page run in order in one namespace, as a reader would read them, starting from
``torch`` and ``danlu`` (the imports every page assumes). A block that needs objects the page
does not build (a ``model``, a ``loader``) names a prelude in an HTML comment directly above it,
``<!-- docs-test: prelude=NAME -->``: the prelude (below) defines small versions of them in the
namespace first (tiny models, a few batches), and may exercise what the block built afterwards
(train the ``Trainer`` it made, call the compiled step it defined). A block that cannot run
alone says why, ``<!-- docs-test: skip REASON -->``. A block with neither runs as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import tiny_models
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import danlu

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<directive>.*?)\s*-->\s*$")
COMMENT = re.compile(r"^\s*<!--.*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # of the first code line, 1-based
    code: str
    prelude: str | None = None
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The python blocks of ``page`` with their markers, and the marker errors found."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, errors, used = [], [], set()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence["indent"], fence["lang"]
        end = i + 1
        while end < len(lines) and not re.match(rf"^{indent}```\s*$", lines[end]):
            end += 1
        if lang in ("python", "py"):
            code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
            block = Block(page, i + 2, code)
            above = i - 1
            while above >= 0 and COMMENT.match(lines[above]):
                marker = MARKER.match(lines[above])
                if marker:
                    used.add(above)
                    directive = marker["directive"]
                    where = f"{block.where}: {directive!r}"
                    if directive.startswith("prelude="):
                        block.prelude = directive.removeprefix("prelude=")
                        if block.prelude not in PRELUDES:
                            errors.append(f"{where}: no such prelude")
                    elif directive.startswith("skip"):
                        block.skip = directive.removeprefix("skip").strip()
                        if len(block.skip) < 10:
                            errors.append(f"{where}: a skip needs its reason")
                    else:
                        errors.append(f"{where}: unknown directive")
                above -= 1
            if block.prelude and block.skip:
                errors.append(f"{block.where}: both a prelude and a skip")
            blocks.append(block)
        i = end + 1
    for n, line in enumerate(lines):
        if MARKER.match(line) and n not in used:
            errors.append(f"{page.relative_to(ROOT)}:{n + 1}: marker not directly above a block")
    return blocks, errors


# -- preludes -------------------------------------------------------------------------------------

VOCAB, DIM = 32, 16


class Output(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor


class TransformerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.ff = nn.Linear(DIM, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ff(self.norm(h))


class MyTransformer(nn.Module):
    """A two-block language model with the attribute names the docs use (``embed``,
    ``blocks``, ``lm_head``); ``model(tokens).loss`` is the next-token loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([TransformerBlock(), TransformerBlock()])
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> Output:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.norm(h))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        return Output(loss, logits)


def token_batches(count: int, size: int = 2, length: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (size, length), generator=gen) for _ in range(count)]


def lm(ns: dict[str, Any], tmp: Path) -> None:
    """``MyTransformer``, ``model``, ``loader`` (4 batches of token ids), ``batch``, its
    ``loss`` (graph alive) and the final ``hidden`` state."""
    model = MyTransformer()
    loader = token_batches(4)
    ns.update(MyTransformer=MyTransformer, model=model, loader=loader, batch=loader[0])
    ns["loss"] = model(loader[0]).loss
    ns["hidden"] = model.norm(model.embed(loader[0]))


def moved(before: list[torch.Tensor], model: nn.Module) -> bool:
    pairs = zip(before, model.parameters(), strict=True)
    return any(not torch.equal(a, p.detach()) for a, p in pairs)


def train_one_step(ns: dict[str, Any]) -> None:
    """One step with the block's ``model`` and ``opt``; the parameters must move."""
    model, opt = ns["model"], ns["opt"]
    before = [p.detach().clone() for p in model.parameters()]
    batch = ns.get("batch", token_batches(1)[0])
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    assert moved(before, model), "the optimizer the block built did not move the model"


def tiny_llama() -> nn.Module:
    return tiny_models.tiny_llama(VOCAB, hidden=DIM)


def token_dicts(count: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": t, "labels": t} for t in token_batches(count)]


def hf_trainer(ns: dict[str, Any], tmp: Path) -> None:
    """A tiny LLaMA ``model`` (transformers, random init), ``data`` (8 sequences) and ``args``
    (2 steps on the CPU, nothing saved or reported)."""
    from transformers import TrainingArguments

    ns["model"] = tiny_llama()
    ns["data"] = [{k: v[0] for k, v in d.items()} for d in token_dicts(8)]
    ns["args"] = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def train_the_trainer(ns: dict[str, Any]) -> None:
    """Train the ``trainer`` the block built for 2 steps; it must use a danlu optimizer."""
    trainer, model = ns["trainer"], ns["model"]
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(inner).__module__.startswith("danlu."), type(inner)
    assert moved(before, model), "the Trainer did not move the model"


def configure_lightning(ns: dict[str, Any]) -> None:
    """Call ``configure_optimizers`` of the block's ``Model`` (given a layer) and step."""

    class WithLayer(ns["Model"]):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)

    module = WithLayer()
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    module.layer(torch.randn(2, 4)).square().mean().backward()
    opt.step()
    sched.step()


def regression(ns: dict[str, Any], tmp: Path) -> None:
    """A small MLP ``model`` and a batch ``x``, ``y`` for ``mse_loss(model(x), y)``."""
    torch.manual_seed(0)
    ns["model"] = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ns["x"], ns["y"] = torch.randn(4, 8), torch.randn(4, 4)


def run_compiled_step(ns: dict[str, Any]) -> None:
    """Call the block's compiled ``train_step`` 3 times with the scheduler between."""
    losses = []
    for _ in range(3):
        losses.append(float(ns["train_step"](ns["x"], ns["y"])))
        ns["sched"].step()
    assert losses[-1] < losses[0], losses


def process_group(ns: dict[str, Any], tmp: Path) -> None:
    """A gloo process group of one process, and ``model``/``loader`` as for ``lm``."""
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp / f"store-{len(list(tmp.iterdir()))}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    lm(ns, tmp)


def ddp(ns: dict[str, Any], tmp: Path) -> None:
    """As ``process-group``, with ``model`` wrapped in ``DistributedDataParallel``."""
    process_group(ns, tmp)
    ns["model"] = nn.parallel.DistributedDataParallel(ns["model"])


def leave_the_group(ns: dict[str, Any]) -> None:
    dist.destroy_process_group()


def step_and_leave_the_group(ns: dict[str, Any]) -> None:
    try:
        train_one_step(ns)
    finally:
        dist.destroy_process_group()


def checkpoint(ns: dict[str, Any], tmp: Path) -> None:
    """``model``, a Tiger ``opt`` after one step, and a checkpoint ``path``."""
    lm(ns, tmp)
    ns["opt"] = danlu.Tiger(danlu.param_groups(ns["model"]), lr=1e-3)
    train_one_step(ns)
    ns["path"] = str(tmp / "checkpoint")


def lora(ns: dict[str, Any], tmp: Path) -> None:
    """A tiny LLaMA ``model`` (it has ``q_proj`` and ``v_proj``) and 2 ``batches`` of
    ``{"input_ids", "labels"}``."""
    ns["model"] = tiny_llama()
    ns["batches"] = token_dicts(2)
    ns["batch"] = ns["batches"][0]


def lora_peft(ns: dict[str, Any], tmp: Path) -> None:
    """``load_base_model()`` (a tiny LLaMA, the same weights on every call: it stands for
    ``AutoModelForCausalLM.from_pretrained``) and 2 ``batches`` of ``{"input_ids", "labels"}``."""
    ns["load_base_model"] = tiny_llama
    ns["batches"] = token_dicts(2)


def reloaded_matches(ns: dict[str, Any]) -> None:
    """The block's ``reloaded`` PEFT model (on a fresh base) computes what its ``model`` does."""
    model, reloaded = ns["model"].eval(), ns["reloaded"].eval()
    ids = ns["batches"][0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def adamw_groups(ns: dict[str, Any], tmp: Path) -> None:
    """``model`` and ``groups_by_hand``: decay for matrices, none for biases and norms."""
    lm(ns, tmp)
    params = list(ns["model"].parameters())
    ns["groups_by_hand"] = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


@dataclass
class Prelude:
    setup: Callable[[dict[str, Any], Path], None]
    after: Callable[[dict[str, Any]], None] | None = None
    slow_after: bool = False  # run ``after`` only in test_compiled_recipes_train


PRELUDES = {
    "lm": Prelude(lm),
    "lm-train": Prelude(lm, train_one_step),
    "hf-trainer": Prelude(hf_trainer, train_the_trainer),
    "lightning": Prelude(lambda ns, tmp: None, configure_lightning),
    "compile": Prelude(regression, run_compiled_step, slow_after=True),
    "process-group": Prelude(process_group, step_and_leave_the_group),
    "ddp": Prelude(ddp, leave_the_group),
    "checkpoint": Prelude(checkpoint),
    "lora": Prelude(lora, train_one_step),
    "lora-peft": Prelude(lora_peft, reloaded_matches),
    "adamw-groups": Prelude(adamw_groups, train_one_step),
}


# -- the tests ------------------------------------------------------------------------------------


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if parse(page)[0]]


def test_markers_are_well_formed():
    errors = [error for page in PAGES for error in parse(page)[1]]
    assert not errors, "\n".join(errors)


def test_skips_are_few():
    skipped = [(b.where, b.skip) for page in PAGES for b in parse(page)[0] if b.skip]
    assert len(skipped) <= 3, skipped


def run_block(block: Block, ns: dict[str, Any], tmp: Path, *, slow: bool) -> None:
    prelude = PRELUDES[block.prelude] if block.prelude else None
    if prelude is not None:
        prelude.setup(ns, tmp)
    # padded so that tracebacks give the line numbers of the Markdown file
    code = compile("\n" * (block.line - 1) + block.code, block.where.split(":")[0], "exec")
    try:
        exec(code, ns)
        if prelude is not None and prelude.after is not None and prelude.slow_after == slow:
            prelude.after(ns)
    except Exception as exc:
        raise AssertionError(f"the block at {block.where} fails: {exc!r}") from exc


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    torch.manual_seed(0)
    yield {"__name__": "__docs__", "torch": torch, "danlu": danlu}
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_every_python_block_runs(page, namespace, tmp_path):
    for block in parse(page)[0]:
        if block.skip is None:
            run_block(block, namespace, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_recipes_train(namespace, tmp_path):
    """The blocks whose prelude compiles (minutes of Inductor on one core, so apart)."""
    blocks = [b for page in PAGES for b in parse(page)[0] if b.prelude == "compile"]
    assert blocks
    for block in blocks:
        run_block(block, namespace, tmp_path, slow=True)
