"""The setup checks, run against the training setup named by ``--lmcheck-trainer``.

    pytest --pyargs lmcheck.suite --lmcheck-trainer my_project.train:make_trainer
    pytest -m gpu --pyargs lmcheck.suite --lmcheck-trainer my_project.train:make_trainer

The function returns your ``transformers.Trainer``, ``(model, train_step, batches)`` or a mapping
of ``check_loop``'s arguments (see ``lmcheck.batteries.load_setup``); the battery runs once per
session, and each check of ``SETUP_CHECKS`` is one test.

The ``gpu`` marker: where a CUDA device is visible these tests carry it, since your setup trains
where your function puts it (a Trainer picks the GPU by itself), so ``pytest -m gpu`` selects them
and ``-m "not gpu"`` leaves them out. Where none is visible they are unmarked and run on the CPU
(marked, they would be skipped for want of a GPU), so ``-m gpu`` there deselects them.
"""

from __future__ import annotations

import pytest

from lmcheck.pytest_plugin import cuda_device_count, expect_pass
from lmcheck.setup import DISTRIBUTED_CHECKS, SETUP_CHECKS

pytestmark = [pytest.mark.gpu] if cuda_device_count() else []


@pytest.mark.parametrize("check", list(SETUP_CHECKS), ids=list(SETUP_CHECKS))
def test_training_setup(check, lmcheck_setup_report, lmcheck_results):
    """The setup passes the check; on failure the explanation names the batch, step or parameter
    at fault; a check the setup cannot take (no rebuild for ``reproducible``) is skipped with the
    reason."""
    result = lmcheck_setup_report[check]
    lmcheck_results.append(result)
    expect_pass(result)


@pytest.mark.parametrize("check", list(DISTRIBUTED_CHECKS), ids=list(DISTRIBUTED_CHECKS))
def test_data_parallel_setup(check, lmcheck_setup_report, lmcheck_results):
    """Under torchrun (``torchrun --nproc_per_node N -m pytest --pyargs lmcheck.suite ...``) the
    distributed probes join the report; in one process they are skipped."""
    if check not in [r.name for r in lmcheck_setup_report.results]:
        pytest.skip(f"{check}: runs only under torchrun or accelerate launch, on more than one rank")
    result = lmcheck_setup_report[check]
    lmcheck_results.append(result)
    expect_pass(result)
