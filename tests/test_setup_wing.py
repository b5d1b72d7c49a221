"""The setup wing's shape: one battery table, one checked budget, and every argument checked
before any of the user's objects is touched.

A bad argument to ``check_loop``, ``check_trainer`` or a data-parallel probe raises an InputError
that names it, and the user's loader (its generator), model and optimizer are exactly as they
were: nothing was read, stepped or put back.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import lmcheck.setup.battery as battery
from lmcheck.errors import InputError
from lmcheck.results import Result
from lmcheck.setup import (
    CHECKS,
    DISTRIBUTED_CHECKS,
    SETUP_CHECKS,
    SetupBudget,
    check_loop,
    check_trainer,
    distributed,
)
from tests import setups


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return setups.tokenizer()


class Watched:
    """The user's objects and a record of what touched them."""

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.model = setups.model(tok)
        self.loop = setups.Loop(self.model)
        self.loader = setups.loader(tok)
        self.loop.step(next(iter(self.loader)))  # the optimizer holds state, the generator has moved
        self.loop.step(next(iter(self.loader)))
        self.generator = self.loader.generator.get_state()
        self.weights = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.optimizer = copy.deepcopy(self.loop.optimizer.state_dict())
        self.calls = self.loop.calls
        self.epochs_asked = 0

    def batches_of_epoch(self, epoch: int) -> Any:
        self.epochs_asked += 1
        return self.loader

    def unchanged(self) -> bool:
        weights = all(torch.equal(p, self.weights[n]) for n, p in self.model.named_parameters())
        state = self.loop.optimizer.state_dict()["state"]
        optimizer = all(torch.equal(state[i][k], v) for i, saved in self.optimizer["state"].items()
                        for k, v in saved.items())
        return (torch.equal(self.loader.generator.get_state(), self.generator) and weights and optimizer
                and self.loop.calls == self.calls and self.epochs_asked == 0)


class _Plain:
    """Neither a scheduler nor a state to save."""

    def __repr__(self) -> str:
        return "plain"


LOOP_MISTAKES = [
    ("stateful", "a GradScaler"), ("stateful", [_Plain()]), ("sampling", "sometimes"), ("scheduler", _Plain()),
    ("steps", 0), ("overfit_batches", 65), ("overfit_steps", -1), ("check_every", 1.5), ("max_grad_norm", -1.0),
    ("evaluate", 42), ("progress", "a bar"), ("as_batch", 1), ("rebuild", "again"), ("schedule", 3e-4),
]


@pytest.mark.parametrize(("argument", "value"), LOOP_MISTAKES, ids=[f"{a}={v!r}" for a, v in LOOP_MISTAKES])
@pytest.mark.parametrize("batches", ["loader", "function"])
def test_check_loop_refuses_a_bad_argument_before_touching_anything(tok, argument, value, batches):
    user = Watched(tok)
    given = user.loader if batches == "loader" else user.batches_of_epoch
    with pytest.raises(InputError, match=f"'{argument}'"):
        check_loop(user.model, user.loop.step, given, **{argument: value})
    assert user.unchanged()


def test_a_loader_that_fails_while_read_is_put_back(tok):
    """The first batches are read after every argument is checked; a loader that raises on its
    second batch leaves its generator where it was."""
    user = Watched(tok)
    collate = user.loader.collate_fn
    seen = [0]

    def breaks(examples: Any) -> Any:
        seen[0] += 1
        if seen[0] == 2:
            raise RuntimeError("a broken example")
        return collate(examples)

    user.loader.collate_fn = breaks
    with pytest.raises(InputError, match="'batches' raised RuntimeError"):
        check_loop(user.model, user.loop.step, user.loader)
    user.loader.collate_fn = collate
    assert user.unchanged()


TRAINER_MISTAKES = [("steps", 0), ("overfit_steps", 0), ("rebuild", 42), ("progress", "a bar"),
                    ("check_every", -2)]


@pytest.mark.parametrize(("argument", "value"), TRAINER_MISTAKES, ids=[f"{a}={v!r}" for a, v in TRAINER_MISTAKES])
def test_check_trainer_refuses_a_bad_argument_before_touching_the_trainer(tok, tmp_path, argument, value):
    trainer = setups.trainer(tok, str(tmp_path))
    dataset = trainer.train_dataset
    read = [0]

    class Counted(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int) -> Any:
            read[0] += 1
            return dataset[index]

    trainer.train_dataset = Counted()
    attributes = dict(vars(trainer))
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(InputError, match=f"'{argument}'"):
        check_trainer(trainer, **{argument: value})
    assert read[0] == 0
    assert dict(vars(trainer)) == attributes
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())


def _probe_calls(user: Watched) -> list[tuple[str, Any]]:
    batch = next(iter(user.loader))
    user.generator = user.loader.generator.get_state()
    return [
        ("steps", lambda: distributed.grads_synchronized(user.model, user.loop.step, user.loader, steps=0)),
        ("max_grad_norm", lambda: distributed.grads_synchronized(user.model, user.loop.step, user.loader,
                                                                 max_grad_norm=-1)),
        ("as_batch", lambda: distributed.ddp_matches_single(user.model, user.loop.step, user.loader, as_batch=7)),
        ("epochs", lambda: distributed.data_sharding(user.batches_of_epoch, epochs=1)),
        ("as_batch", lambda: distributed.data_sharding(user.batches_of_epoch, as_batch="no")),
        ("sample", lambda: distributed.rank_randomness(user.model, batch, sample=3)),
        ("train_step", lambda: distributed.grads_synchronized(user.model, None, user.loader)),
    ]


def test_the_data_parallel_probes_refuse_a_bad_argument_before_anything_else(tok):
    """Even before the process group is looked for: these run in one process, without one."""
    user = Watched(tok)
    for argument, call in _probe_calls(user):
        with pytest.raises(InputError, match=f"'{argument}'"):
            call()
        assert user.unchanged(), argument


def test_without_a_process_group_the_probes_say_so():
    user_model = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="initialized torch.distributed process group"):
        distributed.same_init(user_model)


# ---------------------------------------------------------------- the budget and the table


def test_the_budget_is_one_frozen_checked_dataclass():
    budget = SetupBudget()
    assert (budget.steps, budget.overfit_batches, budget.overfit_steps, budget.check_every) == (8, 4, 200, 5)
    assert SetupBudget.of(steps=None, overfit_steps=50) == SetupBudget(overfit_steps=50)
    with pytest.raises(AttributeError):
        budget.steps = 3  # type: ignore[misc]
    for field, value in (("steps", 0), ("overfit_batches", 0), ("overfit_steps", True), ("check_every", "5")):
        with pytest.raises(InputError, match=f"'{field}'"):
            SetupBudget(**{field: value})


def test_the_cli_and_the_plugin_say_the_budgets_defaults(capsys, pytester):
    from lmcheck.cli import main

    with pytest.raises(SystemExit):
        main(["train-check", "--help"])
    cli = " ".join(capsys.readouterr().out.split())
    plugin = " ".join(pytester.runpytest_inprocess("--help").stdout.str().split())
    budget = SetupBudget()
    assert f"(default {budget.steps})" in cli
    assert f"(default {budget.overfit_steps})" in cli
    for value in (budget.steps, budget.overfit_steps, budget.overfit_batches, budget.check_every):
        assert f"(default {value})" in plugin


def test_the_table_holds_every_check_once_in_report_order():
    names = [c.name for c in CHECKS]
    assert len(names) == len(set(names))
    assert tuple(names) == SETUP_CHECKS + DISTRIBUTED_CHECKS
    for check in CHECKS:
        assert set(check.follows) <= set(names), check.name
        assert all(names.index(cause) != names.index(check.name) for cause in check.follows)


def test_a_new_check_is_one_row_of_the_table(tok, monkeypatch):
    """A judge that reads what the session recorded, added as a row, reports with the rest."""
    def first_step_lr(session: battery.Session) -> Result:
        lr = session.first.run.steps[0].lrs[0]
        return Result(name="first_lr_positive", passed=lr > 0, metrics={"lr": lr},
                      explanation=f"the first optimizer step's learning rate is {lr:g}")

    row = battery.Check("first_lr_positive", battery.FIRST_RUN, first_step_lr)
    monkeypatch.setattr(battery, "CHECKS", (*battery.CHECKS, row))
    net = setups.model(tok)
    loop = setups.Loop(net)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, overfit_steps=5)
    assert [r.name for r in report][-1] == "first_lr_positive"
    assert report["first_lr_positive"].passed


# ---------------------------------------------------------------- cost and footprint


def test_the_report_gives_each_checks_time_and_optimizer_steps(tok, tmp_path):
    net = setups.model(tok)
    loop = setups.Loop(net)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, steps=4, overfit_steps=5)
    assert set(report.costs) == set(SETUP_CHECKS)
    assert report.costs["gradient_flow"]["optimizer_steps"] == 4  # the first run starts there
    assert report.costs["batch_supervision"]["optimizer_steps"] == 0
    assert report.costs["accumulation"]["optimizer_steps"] == 0  # backward passes only
    assert 1 <= report.costs["overfits"]["optimizer_steps"] <= 10
    assert report.optimizer_steps == sum(c["optimizer_steps"] for c in report.costs.values())
    assert all(c["seconds"] >= 0 for c in report.costs.values())
    text = report.to_markdown(tmp_path / "report.md", plot=False).read_text()
    assert f"They ran {report.optimizer_steps} optimizer steps" in text
    assert report.to_dict()["costs"] == report.costs


def _large_tensors(floor: int) -> list[torch.Tensor]:
    import gc

    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() >= floor]


@pytest.mark.parametrize("entry", ["check_loop", "check_trainer"])
def test_nothing_model_sized_of_the_check_stays_alive(tok, tmp_path, entry):
    """With the collector off, every model-sized tensor alive after the entry point returns was
    alive before it (the user's weights, gradients and optimizer state): the snapshot, the
    recorded gradients and the reference are freed as soon as the call returns."""
    import gc

    if entry == "check_loop":
        net = setups.model(tok)
        loop = setups.Loop(net)
        run = lambda: check_loop(net, loop.step, setups.loader(tok), tokenizer=tok,  # noqa: E731
                                 scheduler=loop.scheduler, max_grad_norm=1.0, steps=4, overfit_steps=5)
    else:
        trainer = setups.trainer(tok, str(tmp_path))
        net = trainer.model
        run = lambda: check_trainer(trainer, steps=4, overfit_steps=5)  # noqa: E731
    floor = max(p.numel() for p in net.parameters())  # the largest parameter's size
    gc.collect()
    before = {id(t) for t in _large_tensors(floor)}
    gc.disable()
    try:
        report = run()
        left = [t for t in _large_tensors(floor) if id(t) not in before]
    finally:
        gc.enable()
    assert report.results
    assert [(tuple(t.shape), t.device.type) for t in left] == []


def test_a_check_that_runs_out_of_memory_is_not_applicable_and_the_rest_run(tok, monkeypatch):
    def too_big(*args: Any, **kwargs: Any) -> Result:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(battery, "accumulation", too_big)
    net = setups.model(tok)
    loop = setups.Loop(net)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, steps=4, overfit_steps=5)
    assert report["accumulation"].status == "n/a"
    assert "ran out of memory (OutOfMemoryError: CUDA out of memory" in report["accumulation"].skip_reason
    assert report["gradient_flow"].status == "pass"


def test_the_liveness_count_sees_a_check_that_keeps_its_copies(tok, monkeypatch):
    """The negative control of the test above: a battery that keeps its driver (and so its
    snapshot) alive leaves model-sized tensors behind, and the count finds them."""
    import gc

    import lmcheck.setup.loop as loop_module

    kept: list[Any] = []

    def keeping(driver: Any, *args: Any, **kwargs: Any) -> Any:
        kept.append(driver)
        return battery.run_battery(driver, *args, **kwargs)

    monkeypatch.setattr(loop_module, "run_battery", keeping)
    net = setups.model(tok)
    loop = setups.Loop(net)
    floor = max(p.numel() for p in net.parameters())
    gc.collect()
    before = {id(t) for t in _large_tensors(floor)}
    gc.disable()
    try:
        check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                   max_grad_norm=1.0, steps=4, overfit_steps=5)
        left = [t for t in _large_tensors(floor) if id(t) not in before]
    finally:
        gc.enable()
    assert kept
    assert left, "the snapshot kept by the driver should be found alive"


# ---------------------------------------------------------------- packed rows


def test_a_packed_row_is_keyed_by_its_documents():
    """``position_ids`` that restart mark the documents of a packed row: each gets the key a row
    of its own would get, so data order and resume compare examples, not packings."""
    from lmcheck.setup.order import row_keys

    first, second = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    packed = {"input_ids": torch.cat([first, second], dim=1), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert row_keys(packed) == row_keys({"input_ids": first}) + row_keys({"input_ids": second})
    assert len(row_keys({"input_ids": packed["input_ids"]})) == 1  # without positions: one row


def test_a_packed_documents_prefixes_restart_at_its_start():
    """The memorization check leaves out a position whose prefix recurs with another next token:
    in a packed row the prefix is the document's own, as the model sees it."""
    from lmcheck.setup.overfit import _prefix_hashes

    ids = torch.tensor([[4, 5, 4, 6]])
    alone = _prefix_hashes(torch.tensor([[4, 5]]))
    packed = _prefix_hashes(ids, torch.tensor([[0, 1, 0, 1]]))
    assert packed[0, 0] == packed[0, 2] == alone[0, 0]  # the same one-token prefix in both documents
    assert _prefix_hashes(ids)[0, 2] != alone[0, 0]  # whole-row prefixes never recur
