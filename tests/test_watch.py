"""The guard for the real run (``lmcheck.watch``), with faults injected mid-run.

Each fault is put into a healthy run at a known step, and the guard must catch it at that step
with the configured action and nothing lost: a NaN loss (the step not applied: the run ends with
the weights of a run that never saw that batch), an Inf gradient in one parameter, a corrupted
batch (a loss spike), the learning rate set to 0 half-way, a parameter group frozen half-way, a
GradScaler whose scale collapses, a save after NaN weights (refused; the previous checkpoint
still loads). The healthy loop and the healthy Trainer of 200 steps raise no event.

The model is a tiny Llama trained on four fixed batches of a tiny corpus, so its loss falls from
ln V to well below it within the first hundred steps.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import stacks
import torch
from transformers import Trainer, TrainerCallback

import lmcheck
from lmcheck.errors import LmcheckError
from lmcheck.watch import GuardStop, Rules, TrainerGuard


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


@pytest.fixture(scope="module")
def batches(tok) -> list[dict[str, torch.Tensor]]:
    return list(stacks.chunk_loader(tok, length=12, batch_size=4))


def setup(tok: Any, lr: float = 1e-2, groups: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = stacks.llama(tok)
    if groups:  # the embeddings in a group of their own
        embeddings = list(model.get_input_embeddings().parameters())
        rest = [p for p in model.parameters() if all(p is not e for e in embeddings)]
        return model, torch.optim.AdamW([{"params": embeddings}, {"params": rest}], lr=lr, weight_decay=0.0)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def nan_at(model: torch.nn.Module, step: int) -> Callable[[], None]:
    """From the ``step``-th training forward on, once: the embeddings' output is NaN, so the loss is."""
    seen = [0]

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if module.training:
            seen[0] += 1
            if seen[0] == step:
                return output * math.nan
        return None

    return model.get_input_embeddings().register_forward_hook(hook).remove


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
          steps: int, *, before_step: Callable[[int], None] | None = None, scheduler: Any = None,
          skip_batch: int | None = None) -> None:
    """The user's loop, unchanged by the guard, clipping as nanoGPT's does: batch ``i`` at step
    ``i`` (cycling), except that ``skip_batch`` is left out (the reference run for a skipped step).
    ``before_step(step)`` runs after the backward, before clipping."""
    order = [i for i in range(steps) if i + 1 != skip_batch]
    for step, i in enumerate(order, start=1):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        if before_step is not None:  # a fault in the backward
            before_step(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def conditions(guard: Any) -> list[tuple[int, str, str]]:
    return [(e.step, e.condition, e.action) for e in guard.events]


# ---------------------------------------------------------------- healthy runs


@pytest.fixture
def steady_clock(monkeypatch):
    """The guard's clock, 10 ms a step: the tests' workers share the machine's cores, so a healthy
    run's real throughput halves whenever a neighbour starts work (the throughput condition is
    judged on a clock of the test's own in test_falling_throughput_is_caught)."""
    import lmcheck.watch.guard as engine

    ticks = [0]

    def now() -> float:
        ticks[0] += 1
        return ticks[0] * 0.01

    monkeypatch.setattr(engine.time, "perf_counter", now)


def test_a_healthy_loop_of_200_steps_raises_no_event(tok, batches, tmp_path, steady_clock):
    model, optimizer = setup(tok)
    with lmcheck.watch(model, optimizer, log_dir=tmp_path) as guard:
        train(model, optimizer, batches, 200)
    assert guard.events == [], [e.message for e in guard.events]
    assert guard.step == 200
    assert len(guard.history["loss"]) == 200
    assert guard.history["loss"][-1] < 0.5 * guard.history["loss"][0]
    summary = (tmp_path / "lmcheck-watch.md").read_text()
    assert "optimizer steps watched: 200" in summary
    assert "events: 0" in summary
    assert (tmp_path / "lmcheck-watch.png").stat().st_size > 0


def test_a_healthy_lora_loop_of_200_steps_raises_no_event(tok, batches, tmp_path, steady_clock):
    """PEFT's LoRA on a pretrained base, its frozen weights left in the optimizer's group (they
    have no gradient): quiet while the adapter learns."""
    model = stacks.lora(stacks.pretrained_llama(tok, str(tmp_path / "base")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with lmcheck.watch(model, optimizer) as guard:
        train(model, optimizer, batches, 200)
    assert guard.events == [], [e.message for e in guard.events]
    assert guard.history["loss"][-1] < 0.5 * guard.history["loss"][0]


def test_the_guard_unhooks_itself(tok, batches):
    model, optimizer = setup(tok)
    original = torch.save
    with lmcheck.watch(model, optimizer) as guard:
        assert torch.save is not original
        train(model, optimizer, batches, 2)
    assert torch.save is original
    train(model, optimizer, batches, 2)
    assert guard.step == 2


# ---------------------------------------------------------------- a NaN loss, an Inf gradient


def test_a_nan_loss_is_skipped_and_the_run_ends_as_if_the_batch_was_never_seen(tok, batches):
    model, optimizer = setup(tok)
    remove = nan_at(model, 7)
    with lmcheck.watch(model, optimizer) as guard:
        train(model, optimizer, batches, 12)
    remove()
    reference, reference_optimizer = setup(tok)
    train(reference, reference_optimizer, batches, 12, skip_batch=7)
    assert conditions(guard) == [(7, "nonfinite", "skip")]
    assert guard.skipped == [7]
    assert "the loss is nan" in guard.events[0].message
    assert "step skipped" in guard.events[0].message
    assert same(weights(model), weights(reference))  # neither the weights nor Adam's state moved at step 7


def test_a_nan_loss_under_stop_raises_before_the_update(tok, batches):
    model, optimizer = setup(tok)
    remove = nan_at(model, 5)
    kept: dict[str, dict[str, torch.Tensor]] = {}
    with pytest.raises(GuardStop) as stopped, lmcheck.watch(model, optimizer, rules=Rules(nonfinite="stop")) as guard:
        train(model, optimizer, batches, 12, before_step=lambda step: kept.update({"w": weights(model)}))
    remove()
    assert stopped.value.event.step == 5
    assert stopped.value.event.condition == "nonfinite"
    assert guard.step == 5
    assert same(weights(model), kept["w"])


def test_an_inf_gradient_in_one_parameter_is_named(tok, batches):
    model, optimizer = setup(tok)
    target = "model.layers.1.mlp.down_proj.weight"

    def corrupt(step: int) -> None:
        if step == 9:
            model.get_parameter(target).grad[0, 0] = math.inf

    with lmcheck.watch(model, optimizer) as guard:
        train(model, optimizer, batches, 12, before_step=corrupt)
    assert conditions(guard) == [(9, "nonfinite", "skip")]
    assert guard.events[0].names == [target]
    assert target in guard.events[0].message
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_skipped_steps_stop_the_run(tok, batches):
    model, optimizer = setup(tok)

    def corrupt(step: int) -> None:
        if step >= 3:
            next(model.parameters()).grad.fill_(math.nan)

    with pytest.raises(GuardStop, match="above max_skipped=2"), lmcheck.watch(
            model, optimizer, rules=Rules(max_skipped=2)) as guard:
        train(model, optimizer, batches, 12, before_step=corrupt)
    assert guard.skipped == [3, 4, 5]
    assert guard.events[-1].action == "stop"


# ---------------------------------------------------------------- spikes


def test_a_corrupted_batch_is_a_loss_spike_at_its_step(tok, batches):
    """The guard joins a run whose loss has settled (as a long run's has): a batch of random
    tokens is skipped at its step, and the run goes on."""
    model, optimizer = setup(tok)
    train(model, optimizer, batches, 150)
    noise = {k: v.clone() for k, v in batches[0].items()}
    noise["input_ids"] = torch.randint(0, len(tok), noise["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    noise["labels"] = noise["input_ids"].clone()
    corrupted = [*batches * 40][:139] + [noise] + batches  # step 140 reads the corrupted batch
    with lmcheck.watch(model, optimizer, rules=Rules(loss_spike="skip")) as guard:
        for batch in corrupted:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    spikes = [e for e in guard.events if e.condition == "loss_spike"]
    assert [(e.step, e.action) for e in spikes] == [(140, "skip")], [e.message for e in guard.events]
    assert guard.skipped == [140]
    assert spikes[0].value > spikes[0].threshold > 2 * spikes[0].window["median"]
    assert "median" in spikes[0].message
    assert spikes[0].window["steps"] == 128


# ---------------------------------------------------------------- learning rate, frozen groups


def test_the_learning_rate_set_to_0_half_way_is_caught_against_the_scheduler(tok, batches):
    model, optimizer = setup(tok)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))

    def zero(step: int) -> None:
        if step == 15:
            for group in optimizer.param_groups:
                group["lr"] = 0.0

    with lmcheck.watch(model, optimizer, scheduler=scheduler) as guard:
        train(model, optimizer, batches, 20, before_step=zero, scheduler=scheduler)
    lr = [e for e in guard.events if e.condition == "learning_rate"]
    assert lr
    assert lr[0].step == 15
    assert lr[0].value == 0.0
    assert lr[0].threshold == pytest.approx(1e-2)
    assert "the scheduler's course recorded at the start" in lr[0].message


def test_the_learning_rate_set_to_0_without_a_scheduler(tok, batches):
    model, optimizer = setup(tok)

    def zero(step: int) -> None:
        if step == 10:
            optimizer.param_groups[0]["lr"] = 0.0

    with lmcheck.watch(model, optimizer) as guard:
        train(model, optimizer, batches, 20, before_step=zero)
    assert conditions(guard) == [(10, "learning_rate", "warn")], [e.message for e in guard.events]


def test_a_parameter_group_frozen_half_way_is_caught(tok, batches):
    model, optimizer = setup(tok, groups=True)

    def freeze(step: int) -> None:
        if step == 20:  # the embeddings' group stops learning: no gradient reaches it any more
            for p in optimizer.param_groups[0]["params"]:
                p.requires_grad_(False)
                p.grad = None

    with lmcheck.watch(model, optimizer) as guard:
        train(model, optimizer, batches, 30, before_step=freeze)
    stalled = [e for e in guard.events if e.condition == "stalled"]
    assert guard.events[0] is stalled[0]
    assert conditions(guard)[0] == (20, "stalled", "warn")
    assert len(stalled) == 1
    assert "parameter group 0 stopped moving" in guard.events[0].message
    assert guard.events[0].names == ["model.embed_tokens.weight"]


def test_a_group_whose_updates_vanish_is_caught(tok, batches):
    """Its learning rate unchanged and its gradients there, but scaled by 1e-12 from step 25 (a
    hook that zeroes them, a loss multiplied by a vanishing weight): the update per unit of
    learning rate collapses at that step (SGD without momentum, so it does at once)."""
    model = stacks.llama(tok)
    embeddings = list(model.get_input_embeddings().parameters())
    rest = [p for p in model.parameters() if all(p is not e for e in embeddings)]
    optimizer = torch.optim.SGD([{"params": embeddings}, {"params": rest}], lr=0.1)

    def vanish(step: int) -> None:
        if step >= 25:
            for p in optimizer.param_groups[1]["params"]:
                p.grad.mul_(1e-12)

    with lmcheck.watch(model, optimizer, rules=Rules(stalled="stop")) as guard, pytest.raises(GuardStop) as stopped:
        train(model, optimizer, batches, 40, before_step=vanish)
    assert stopped.value.event.condition == "stalled"
    assert stopped.value.event.step == 26
    assert "parameter group 1 stopped moving" in stopped.value.event.message
    assert guard.events[-1].action == "stop"


# ---------------------------------------------------------------- the loss scale, the throughput


def test_a_collapsing_loss_scale_is_caught(tok, batches):
    model, optimizer = setup(tok)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    with lmcheck.watch(model, optimizer, scaler=scaler) as guard:
        for step in range(1, 21):
            loss = model(**batches[step % 4]).loss
            if step > 10:  # every backward overflows from here: the scaler skips and halves its scale
                loss = loss * math.inf
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert conditions(guard) == [(10, "loss_scale", "warn")], [e.message for e in guard.events]
    assert guard.events[0].value == 0.5
    assert "below 1" in guard.events[0].message
    assert guard.step == 10  # the scaler's own skips are not optimizer steps


def test_a_fused_optimizer_under_a_grad_scaler_is_judged_unscaled(tok, batches):
    """A fused AdamW stepped by a GradScaler sees the gradients still scaled (the scaler sets
    ``grad_scale`` and ``found_inf`` on the optimizer for the step): the guard divides the norm by
    the scale, and a step the scaler skips for an overflow is the scaler's, not a NaN event."""
    model = stacks.llama(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    norms = []
    with lmcheck.watch(model, optimizer, scaler=scaler) as guard:
        for step in range(1, 9):
            loss = model(**batches[step % 4]).loss
            scaler.scale(loss * (math.inf if step == 5 else 1.0)).backward()
            scaler.unscale_(optimizer) if step == 1 else None  # step 1: the unscaled norm, to compare
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert guard.events == [], [e.message for e in guard.events]
    assert guard.step == 7  # the overflowed step is the scaler's skip
    assert guard.history["grad_norm"][0] == pytest.approx(norms[0], rel=1e-5)
    assert guard.history["grad_norm"][1] == pytest.approx(norms[1] / 2.0**16, rel=1e-5)


def test_a_step_given_a_closure_is_judged_once_the_closure_has_run(tok, batches):
    """``optimizer.step(closure)``, the closure given by position (as LBFGS takes it) or by name
    (as Lightning gives it): the gradients exist only once the closure has run."""
    for by_name in (False, True):
        model, optimizer = setup(tok)
        remove = nan_at(model, 3)

        def closure(batch: dict[str, torch.Tensor], model: torch.nn.Module = model,
                    optimizer: torch.optim.Optimizer = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        with lmcheck.watch(model, optimizer) as guard:
            for step in range(1, 6):
                step_closure = functools.partial(closure, batches[step % 4])
                optimizer.step(closure=step_closure) if by_name else optimizer.step(step_closure)
        remove()
        assert conditions(guard) == [(3, "nonfinite", "skip")]
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_falling_throughput_is_caught(tok, batches, monkeypatch):
    """On the guard's clock, made to read 10 ms a step, then 50 ms from step 31: the median
    of the last 10 steps falls below half the start's once more than 5 of them are slow."""
    import lmcheck.watch.guard as engine

    now = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    model, optimizer = setup(tok)

    def tick(step: int) -> None:
        now[0] += 0.05 if step > 30 else 0.01

    rules = Rules(throughput_window=10, throughput_warmup=2)
    with lmcheck.watch(model, optimizer, rules=rules) as guard:
        train(model, optimizer, batches, 50, before_step=tick)
    found = [e for e in guard.events if e.condition == "throughput"]
    assert [e.step for e in found] == [36], [e.message for e in guard.events]
    assert found[0].value == pytest.approx(48 / 0.05)
    assert found[0].window["start"] == pytest.approx(48 / 0.01)
    assert "tokens/s" in found[0].message


# ---------------------------------------------------------------- checkpoints


def test_a_save_after_nan_weights_is_refused_and_the_last_checkpoint_loads(tok, batches, tmp_path):
    model, optimizer = setup(tok)
    remove = nan_at(model, 6)  # let through (warn): the weights turn NaN at step 6

    def run() -> None:
        for step in range(1, 13):
            model(**batches[step % 4]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 4 == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / f"step-{step}.pt")

    with lmcheck.watch(model, optimizer, rules=Rules(nonfinite="warn"), log_dir=tmp_path / "run") as guard, \
            pytest.raises(GuardStop, match="checkpoint save refused") as stopped:
        run()
    remove()
    assert stopped.value.event.step == 8
    assert "model.embed_tokens.weight" in stopped.value.event.names
    assert not (tmp_path / "step-8.pt").exists()
    saved = torch.load(tmp_path / "step-4.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    lines = [json.loads(line) for line in (tmp_path / "run" / "lmcheck-watch.jsonl").read_text().splitlines()]
    assert [(e["step"], e["condition"], e["action"]) for e in lines] == [
        (6, "nonfinite", "warn"), (7, "nonfinite", "warn"), (8, "nonfinite", "warn"), (8, "checkpoint", "refuse")]
    assert guard.events[1].value == "nan" or math.isnan(guard.events[1].value)


# ---------------------------------------------------------------- state


def test_the_guards_state_survives_a_checkpoint(tok, batches, tmp_path):
    """Its windows, counts and events, through ``torch.distributed.checkpoint`` as a Stateful."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = setup(tok)
    remove = nan_at(model, 3)
    with lmcheck.watch(model, optimizer) as guard:
        train(model, optimizer, batches, 30)
        dcp.save({"guard": guard}, checkpoint_id=str(tmp_path / "dcp"))
    remove()
    restored = lmcheck.watch(model, optimizer)
    dcp.load({"guard": restored}, checkpoint_id=str(tmp_path / "dcp"))
    assert restored.state_dict() == guard.state_dict()
    assert restored.step == 30
    assert restored.skipped == [3]
    assert conditions(restored) == conditions(guard)


# ---------------------------------------------------------------- the Trainer


class NanAt(TrainerCallback):
    """Keeps each step's weights; the model's embeddings give NaN at one training forward."""

    def __init__(self, model: torch.nn.Module, forward: int) -> None:
        self.remove = nan_at(model, forward)
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.kept[state.global_step] = weights(model)


def trainer(tok: Any, folder: Any, callbacks: list[Any], model: torch.nn.Module | None = None, **arguments: Any) -> Trainer:
    settings = dict(gradient_accumulation_steps=1, max_steps=200, lr_scheduler_type="cosine", warmup_steps=10)
    settings.update(arguments)
    return Trainer(model=model or stacks.llama(tok), args=stacks.training_arguments(str(folder), **settings),
                   train_dataset=stacks.examples(tok), data_collator=stacks.padded_loader(tok).collate_fn,
                   callbacks=callbacks)


def guard_of(trainer: Trainer) -> Any:
    """The TrainerGuard the Trainer runs (a resumed Trainer makes a new one from the checkpoint)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainerGuard)).guard


def test_a_healthy_trainer_of_200_steps_raises_no_event(tok, tmp_path, steady_clock):
    run = trainer(tok, tmp_path, [TrainerGuard()])
    run.train()
    guard = guard_of(run)
    assert guard.events == [], [e.message for e in guard.events]
    assert guard.step == 200
    assert (tmp_path / "lmcheck-watch.md").exists()
    assert not guard._armed


def test_a_nan_step_in_the_trainer_is_not_applied_and_stops_it(tok, tmp_path):
    model = stacks.llama(tok)
    kept = NanAt(model, 8)
    run = trainer(tok, tmp_path, [kept, TrainerGuard(Rules(nonfinite="stop"))], model=model, max_steps=20)
    run.train()
    kept.remove()
    guard = guard_of(run)
    assert conditions(guard) == [(8, "nonfinite", "stop")]
    assert run.state.global_step == 8
    assert same(kept.kept[8], kept.kept[7])  # step 8 was not applied


def test_the_trainer_does_not_save_nan_weights(tok, tmp_path):
    model = stacks.llama(tok)
    kept = NanAt(model, 5)
    run = trainer(tok, tmp_path, [kept, TrainerGuard(Rules(nonfinite="warn"))], model=model, max_steps=20,
                  save_strategy="steps", save_steps=2)
    run.train()
    kept.remove()
    guard = guard_of(run)
    assert [e.condition for e in guard.events][-1] == "checkpoint"
    assert run.state.global_step == 6
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    reloaded = type(model).from_pretrained(tmp_path / "checkpoint-4")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_the_trainer_restores_the_guard_on_resume(tok, tmp_path):
    model = stacks.llama(tok)
    remove = nan_at(model, 2)
    first = trainer(tok, tmp_path, [TrainerGuard()], model=model, max_steps=8, save_strategy="steps", save_steps=4)
    first.train()
    remove()
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert "TrainerGuard" in saved
    resumed = trainer(tok, tmp_path, [TrainerGuard()], model=stacks.llama(tok), max_steps=8,
                      save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    guard = guard_of(resumed)
    assert guard.step == 8
    assert guard.skipped == [2]
    assert conditions(guard) == [(2, "nonfinite", "skip")]


# ---------------------------------------------------------------- Lightning


def test_the_lightning_guard_skips_a_nan_step(tok, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from test_lightning import LitLM
    from test_lightning import trainer as lightning_trainer

    module = LitLM(tok)
    remove = nan_at(module.model, 6)
    guard = lmcheck.watch.LightningGuard()
    fit = lightning_trainer(max_steps=40, callbacks=[guard], default_root_dir=tmp_path)
    fit.fit(module)
    remove()
    assert isinstance(fit, pl.Trainer)
    assert guard.guard is not None
    assert conditions(guard.guard) == [(6, "nonfinite", "skip")]
    assert guard.guard.step == 40
    assert (tmp_path / "lmcheck-watch.md").exists()  # in the Trainer's log_dir
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_the_lightning_guard_is_restored_from_the_checkpoint(tok, tmp_path):
    pytest.importorskip("lightning.pytorch")
    from test_lightning import LitLM
    from test_lightning import trainer as lightning_trainer

    module = LitLM(tok)
    remove = nan_at(module.model, 3)
    first = lightning_trainer(max_steps=8, callbacks=[lmcheck.watch.LightningGuard()], default_root_dir=tmp_path)
    first.fit(module)
    remove()
    first.save_checkpoint(tmp_path / "step-8.ckpt")
    guard = lmcheck.watch.LightningGuard()
    resumed = lightning_trainer(max_steps=12, callbacks=[guard], default_root_dir=tmp_path)
    resumed.fit(LitLM(tok), ckpt_path=tmp_path / "step-8.ckpt")
    assert guard.guard is not None
    assert guard.guard.step == 12
    assert conditions(guard.guard) == [(3, "nonfinite", "skip")]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Rules(nonfinite="explode"), "'Rules.nonfinite' must be one of"),
    (lambda: Rules(learning_rate="skip"), "'Rules.learning_rate' must be one of"),
    (lambda: Rules(window=0), "'Rules.window'"),
    (lambda: Rules(throughput_fraction=2.0), "'Rules.throughput_fraction'"),
    (lambda: lmcheck.watch("a model"), "'model'"),
    (lambda: lmcheck.watch(torch.nn.Linear(2, 2), optimizer="adam"), "'optimizer' must be a torch.optim.Optimizer"),
    (lambda: lmcheck.watch(torch.nn.Linear(2, 2), lr_schedule=3e-4), "'lr_schedule' must be a function"),
    (lambda: TrainerGuard(rules="strict"), "'rules' must be"),
    (lambda: lmcheck.watch(torch.nn.Linear(2, 2), log_dir=3), "'log_dir' must be a folder's path"),
    (lambda: lmcheck.watch.Guard(torch.nn.Linear(2, 2), stop="never"), "'stop' must be one of"),
])
def test_bad_input_is_named(make, message):
    with pytest.raises(LmcheckError, match=message):
        make()


# ---------------------------------------------------------------- TRL's trainers


@pytest.mark.slow
def test_the_trainer_guard_in_trls_sft_trainer(tok, tmp_path):
    """SFTTrainer is a Trainer: the guard reads the model's loss as it computes it, and a NaN
    step among TRL's accumulated micro-batches is skipped at its optimizer step."""
    model = stacks.llama(tok)
    remove = nan_at(model, 9)  # the 9th micro-batch: the first of optimizer step 5 (two per step)
    run = stacks.sft_trainer(tok, str(tmp_path), stacks.plain_texts(), model=model, max_steps=40)
    run.add_callback(TrainerGuard())
    run.train()
    remove()
    guard = guard_of(run)
    assert conditions(guard) == [(5, "nonfinite", "skip")], [e.message for e in guard.events]
    assert guard.step == 40
    assert all(isinstance(v, float) for v in guard.history["loss"])  # the loss was read at every step


@pytest.mark.slow
def test_the_trainer_guard_in_trls_dpo_trainer(tok, tmp_path):
    """DPOTrainer computes its preference loss outside the model; it gives the model the pairs'
    labels, so the loss the guard reads is the model's language-model loss of the pairs (near
    ln V on this untrained model), not the DPO loss (ln 2 at step 0). A healthy run is quiet."""
    base = str(tmp_path / "base")
    stacks.llama(tok).save_pretrained(base)
    run = stacks.dpo_trainer(tok, str(tmp_path / "run"), base, max_steps=20)
    run.add_callback(TrainerGuard())
    run.train()
    guard = guard_of(run)
    assert guard.events == [], [e.message for e in guard.events]
    assert guard.step == 20
    assert all(math.isfinite(v) for v in guard.history["grad_norm"])
    assert abs(guard.history["loss"][0] - math.log(len(tok))) < 0.2
