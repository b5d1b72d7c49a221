"""Memory housekeeping that costs a training run time: glibc's heap and Python's collector.

Keep freed blocks in the heap, so that a training step does not fault its memory in again.

A small model's training step allocates and frees the same 16-32 MB tensors every step (the
tied embedding's gradient, a chunk of logits). glibc serves blocks that large with ``mmap`` and
gives them back to the kernel when they are freed, so each step touches fresh pages: measured
on a 2-core AVX-512 CPU, 60 steps of chapter 4's recipe took 1.4 million page faults and 2.5 s
of system time. Raising the thresholds keeps those blocks in the heap for the next step
(150,000 faults, 0.3 s). Only lmcheck's own entry points (the ``lmcheck`` command and its test
suite) set them; importing lmcheck changes nothing in a user's process.

Each ``Trainer.train()`` starts with a full ``gc.collect()`` (accelerate's ``free_memory``), which
walks every object in the process: 0.1-0.2 s in a process that has imported transformers, more in
a user's larger one. :func:`heap_frozen` leaves the objects that already exist out of those walks
while ``check_trainer`` calls the user's ``train()`` again and again, and puts them back after.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Iterator
from typing import Any

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling on 64-bit: blocks below it come from the heap
TRIM_THRESHOLD = 256 * 1024 * 1024  # free memory the heap may hold before it shrinks


def _glibc(name: str, *argtypes: type) -> Any:
    """glibc's function ``name`` in this process, or None off Linux or without glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True where they were set
    (Linux with glibc), False elsewhere, which changes nothing."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_blocks() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``); True where it
    ran. With the thresholds raised, a finished stage's freed tensors would otherwise stay in the
    heap: the tutorial calls this between chapters, whose models (BERT-base, SmolLM2, GPT-2 124M)
    would else add up in its peak memory."""
    malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
    if malloc_trim is None:
        return False
    gc.collect()  # the chapter's models are garbage only once their reference cycles are broken
    malloc_trim(0)
    return True


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """Within the block, the objects that existed when it began are skipped by the garbage
    collector (``gc.freeze``); they are put back when it ends, and collected as before. Where
    objects are frozen already (the process called ``gc.freeze`` itself), it changes nothing:
    ``gc.unfreeze`` would release those too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
