"""Non-finite values never pass: where a NaN or Inf sits, said in words.

``NaN > tol`` is False, so a check written as ``difference > tolerance`` passes a model full of
NaNs (torchtest's own ``assert_never_inf`` was wrong the same way). lmcheck closes that hole in
three places, so that no single forgotten comparison can let one through:

1. every model output a probe reads (logits, losses, gradients) goes through
   :func:`require_finite`, which raises :class:`~lmcheck.errors.NonFiniteError` naming the
   row, step, position and token id;
2. every public probe is wrapped in :func:`probe`, which first refuses a model that already holds
   non-finite weights (naming the parameters) and turns a ``NonFiniteError`` into a failed
   :class:`~lmcheck.results.Result` with that message;
3. a ``Result`` holding a NaN metric or headroom cannot be a pass (``lmcheck.results``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from lmcheck.errors import NonFiniteError, NotApplicableError
from lmcheck.results import Result

F = TypeVar("F", bound=Callable[..., Result])


def locate(tensor: torch.Tensor, dims: Sequence[str], *, valid: torch.Tensor | None = None,
           offsets: Sequence[int] = ()) -> str | None:
    """None where every value is finite; else the first non-finite value and where it is.

    ``dims`` names the leading dimensions (``("row", "position", "token id")``); ``valid``, a
    bool tensor over the leading dimensions, limits the search (pads may hold anything);
    ``offsets`` are added to the reported indices (a cached step's position in the sequence).
    Returns e.g. ``"nan at row 0, position 3, token id 17 (12 of 100,514 values are not finite)"``.
    """
    values = tensor.detach()
    if not values.is_floating_point() and not values.is_complex():
        return None
    bad = ~torch.isfinite(values)
    if valid is not None:
        keep = valid.to(device=bad.device, dtype=torch.bool)
        bad = bad & keep.reshape(keep.shape + (1,) * (bad.dim() - keep.dim()))
    if not bool(bad.any()):
        return None
    index = tuple(int(i) for i in bad.nonzero()[0])
    value = float(values[index])
    if values.dim() == 0:
        return f"{value} (not finite)"
    shown = [i + (offsets[d] if d < len(offsets) else 0) for d, i in enumerate(index)]
    place = ", ".join(f"{dim} {i}" for dim, i in zip(dims, shown, strict=False)) or f"index {index}"
    return f"{value} at {place} ({int(bad.sum()):,} of {bad.numel():,} values are not finite)"


def require_finite(tensor: torch.Tensor, what: str, dims: Sequence[str], *,
                   valid: torch.Tensor | None = None, offsets: Sequence[int] = ()) -> None:
    """Raise NonFiniteError, saying ``what`` and where, unless ``tensor`` is finite where valid."""
    found = locate(tensor, dims, valid=valid, offsets=offsets)
    if found is not None:
        raise NonFiniteError(f"{what}: {found}")


def require_finite_number(value: float, what: str) -> float:
    """``value`` if finite; else NonFiniteError saying ``what`` it is (``"the loss"``)."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what}: {value} (not finite)")
    return value


@contextmanager
def in_context(context: str) -> Iterator[None]:
    """Prefix ``context`` (``"prompt 2, padded"``) to a NonFiniteError raised inside the block."""
    try:
        yield
    except NonFiniteError as error:
        raise NonFiniteError(f"{context}: {error}") from error


def non_finite_parameters(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Every parameter (and floating buffer) holding NaN or Inf: name, NaN and Inf counts, size.

    Buffers count only for NaN: some models keep ``-inf`` in a causal-mask buffer on purpose.
    """
    found = []
    tensors: list[tuple[str, torch.Tensor, bool]] = [(n, p, True) for n, p in model.named_parameters()]
    tensors += [(n, b, False) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, tensor, is_parameter in tensors:
        values = tensor.detach()
        if values.is_meta or not values.is_floating_point():
            continue
        if bool(torch.isfinite(values.sum())):
            continue  # NaN and Inf reach the sum (inf - inf is NaN); a finite sum is a clean tensor
        nan = int(torch.isnan(values).sum())
        inf = int(torch.isinf(values).sum()) if is_parameter else 0
        if nan or inf:
            found.append({"parameter": name, "nan": nan, "inf": inf, "values": values.numel()})
    return found


def weights_problem(model: torch.nn.Module) -> tuple[str, list[dict[str, Any]]] | None:
    """A sentence naming the model's non-finite weights, and the rows behind it; None if none."""
    found = non_finite_parameters(model)
    if not found:
        return None
    first = found[0]
    counts = " and ".join(f"{first[k]:,} {label}" for k, label in (("nan", "NaN"), ("inf", "Inf")) if first[k])
    more = f" (and {len(found) - 1} more parameter{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
    return (f"the model already holds non-finite weights before the check ran: "
            f"{first['parameter']} has {counts} of {first['values']:,} values{more}; every "
            f"output computed from them is meaningless (reload the weights, or look for the "
            f"step where the loss first went NaN)"), found


def non_finite_result(name: str, explanation: str, *, details: Sequence[dict[str, Any]] = (),
                      **metrics: Any) -> Result:
    """The failed Result of a probe that met a NaN or Inf: never a pass, never a NaN headroom."""
    return Result(name=name, passed=False, metrics={"non_finite": True, **metrics}, threshold=None,
                  headroom=-math.inf, explanation=explanation, details=tuple(details))


def probe(name: str) -> Callable[[F], F]:
    """Make a function a probe whose result is named ``name`` (or its own ``name`` argument).

    Before the probe runs, a ``model`` argument holding NaN or Inf weights fails it, naming the
    parameters. While it runs, a :class:`NonFiniteError` from any model output it reads becomes
    a failed Result with the error's message, and a :class:`NotApplicableError` (the model lacks
    what the check needs) a not-applicable Result with the reason. Misuse (``InputError``, ``ModelError``) still raises.
    """
    def wrap(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Result:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:
                return function(*args, **kwargs)  # Python's own message for a wrong call
            result_name = arguments.get("name", name)
            result_name = result_name if isinstance(result_name, str) else name
            model = arguments.get("model")
            if isinstance(model, torch.nn.Module):
                problem = weights_problem(model)
                if problem is not None:
                    explanation, rows = problem
                    return non_finite_result(result_name, explanation, details=rows,
                                             non_finite_parameters=len(rows))
            try:
                return function(*args, **kwargs)
            except NonFiniteError as error:
                return non_finite_result(result_name, str(error))
            except NotApplicableError as error:
                return Result.not_applicable(result_name, str(error))

        run.__lmcheck_probe__ = name  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return wrap
