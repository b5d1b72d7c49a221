"""Validate the user's own training setup: their step function, their Trainer or their Lightning
module, their collator, data, optimizer, scheduler, accumulation and clipping, before a long run.

Three entry points take what the user already has and return one :class:`SetupReport`:

- :func:`check_loop` takes a plain loop: the model, ``train_step(batch)`` (their own forward,
  backward, clipping, optimizer and scheduler steps and accumulation, returning the loss) and
  their batches;
- :func:`check_trainer` takes a constructed ``transformers.Trainer`` (TRL's trainers among them);
- :func:`check_lightning` takes a ``lightning.pytorch.Trainer`` and a ``LightningModule``.

lmcheck runs *their* code and watches it from outside (every optimizer step is hooked); it never
substitutes its own loop. Weights, gradients, optimizer and scheduler state and the random
generators are saved first and put back after every run, and a Trainer writes nothing to its
output folder (its runs go to a temporary one, with no checkpoint). How much is run is one
:class:`SetupBudget`. Under torchrun, :mod:`lmcheck.setup.distributed` holds the data-parallel
probes, three of which join the report.

The battery, each a :class:`~lmcheck.results.Result` whose explanation names the batch, row,
step or parameter at fault:

==========================  ====================================================================
``batch_supervision``       every real eos supervised, no empty row, pads -100, one BOS at most,
                            labels not aliasing the inputs (transformers #23530, #22794, trl #598,
                            sglang #888, Fast-LLM #253)
``causal_batch``            labels agree with the inputs; a 4-D mask shows no position its future
``inputs_unchanged``        collating and the step leave ``input_ids`` and the user's -100 labels
                            as they were (transformers #26357, Fast-LLM #253)
``loss_at_init``            near ln V for a model trained from scratch (n/a for a pretrained one)
``loss_matches_reference``  the model's own loss is shifted cross-entropy (transformers #27517,
                            #47395, #46204)
``packing_equivalence``     where rows are packed: each document alone gives the logits, loss and
                            gradients it gets in the row; positions restart, no label crosses
                            (transformers PR #46634; trl #3705, #3067)
``gradient_flow``           at the user's first step every trainable parameter has a finite,
                            non-zero gradient (transformers #21381)
``params_update``           the user's steps change every trainable parameter and no frozen one
``accumulation``            the update over k micro-batches of unequal length equals the gradient
                            of one batch holding the same tokens (transformers #34191, torchtune
                            #1875, #46204; clipping before unscaling, Lightning #9330)
``lr_schedule``             the learning rate at each optimizer step is the schedule's value for
                            that optimizer step, never zero after the first (Lightning #1476)
``overfits``                a handful of the user's batches is memorized within a budget
``data_order``              each epoch a new order of the same examples, none repeated
``reproducible``            the same seed gives the same first losses, another seed other ones
                            (torchtune #2335)
``eval_deterministic``      evaluating twice gives the same loss: dropout off in evaluation
``resume``                  a run saved with the setup's own checkpointing and resumed on a fresh
                            build (a fresh process from the CLI and pytest faces) continues bit
                            for bit as the run never stopped (transformers #17032, #5605, PR
                            #11663; accelerate PRs #4071, #4233; ultralytics PR #11217)
==========================  ====================================================================
"""

from lmcheck.recipes import SetupBudget
from lmcheck.setup.battery import CHECKS, DISTRIBUTED_CHECKS, SETUP_CHECKS, Check
from lmcheck.setup.lightning import check_lightning
from lmcheck.setup.loop import check_loop
from lmcheck.setup.report import SetupReport
from lmcheck.setup.trainer import check_trainer

__all__ = ["CHECKS", "DISTRIBUTED_CHECKS", "SETUP_CHECKS", "Check", "SetupBudget", "SetupReport",
           "check_lightning", "check_loop", "check_trainer"]
