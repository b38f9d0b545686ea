"""Asking the prompt model: independent samples of one meta-prompt, under OPRO's call policy.

Both OPRO loops ask the same way (`ask`): each sample is one job of `dspy_opro.calls.run_jobs`, made on
an LM copy with DSPy's retries off (`dspy_opro.calls.without_retries`), so that OPRO retries transient
failures itself and every request is counted. A sample that still fails has no reply; the caller asks
for it again in its next round, once the rest of the round is done. A failure that retrying cannot fix,
or a round in which every call failed (the model is down), stops the run with `PromptModelError`.

Each sample has its own rollout id (`rollout_id`), so samples stay independent at ``temperature > 0``
with DSPy's cache on, and a rerun with the same key replays the same samples from the cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import dspy

from .calls import Outcome, PromptModelError, run_jobs
from .counting import CallCounter
from .faults import TRANSIENT

logger = logging.getLogger(__name__)


def rollout_id(*key: object) -> int:
    """A stable integer id for one sample, derived from ``key`` (e.g. seed, step, sample index).

    DSPy keys its cache on the rollout id, so samples with distinct ids are independent even
    with the cache on, and a rerun with the same key replays the same sample from the cache.
    """
    raw = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(raw[:6], "big")


def sample_one(
    lm: dspy.BaseLM,
    prompt: str,
    sample: int,
    *,
    temperature: float,
    key: Sequence[object],
    counter: CallCounter | None = None,
    stop: Sequence[str] | None = None,
) -> str:
    """One reply of ``lm`` to ``prompt``: sample number ``sample``, with its own rollout id (``key`` plus ``sample``)."""
    overrides: dict[str, Any] = {"temperature": temperature}
    if temperature > 0:  # DSPy warns about a rollout id at temperature 0, where it changes nothing
        overrides["rollout_id"] = rollout_id(*key, sample)
    sampler = lm.copy(**overrides)
    kwargs = {"stop": list(stop)} if stop else {}
    with counter.context() if counter is not None else dspy.context():
        outputs = sampler(prompt, **kwargs)
    first = outputs[0] if outputs else ""
    return (first.get("text") or "") if isinstance(first, dict) else str(first or "")


def ask(
    lm: dspy.BaseLM,
    prompt: str,
    samples: Sequence[int],
    *,
    temperature: float,
    key: Sequence[object],
    retries: int,
    model: str | None,
    step: int,
    total: int,
    counter: CallCounter | None = None,
    stop: Sequence[str] | None = None,
    num_threads: int = 1,
) -> list[Outcome]:
    """One round of samples of ``prompt`` (see the module docstring).

    Args:
        lm: The prompt model, making one request per call (retries are OPRO's).
        prompt: The meta-prompt.
        samples: The samples' numbers (their rollout ids are ``key`` plus the number).
        temperature: Sampling temperature.
        key: The samples' key (seed, step, ...).
        retries: Retries of a transient failure per sample (the prompt model's ``num_retries``).
        model: The prompt model's name, for messages.
        step: The step, for messages.
        total: How many samples the step asks for in all, for messages.
        counter: Counts the calls.
        stop: Stop strings.
        num_threads: Samples in flight at once.

    Returns:
        One `Outcome` per sample: its reply as ``value``, or its last error; ``failures`` lists the error of
        every request that failed, retried ones included.

    Raises:
        PromptModelError: A failure that retrying cannot fix, or every call of the round failed. Its
            ``partial`` holds the round's outcomes (``None`` for samples a stop left unasked), so that the
            caller can keep the replies that came.
    """
    final: dict[str, Outcome] = {}

    def record(i: int, outcome: Outcome) -> bool:
        if outcome.ok:
            return False
        logger.warning("Prompt model call failed at step %d: %s", step, outcome.describe())
        if outcome.kind != TRANSIENT:  # retrying cannot fix it
            final.setdefault("outcome", outcome)
        return bool(final)

    jobs = [
        functools.partial(sample_one, lm, prompt, j, temperature=temperature, key=key, counter=counter, stop=stop)
        for j in samples
    ]
    outcomes = run_jobs(
        jobs,
        num_threads=num_threads,
        retries=retries,
        on_outcome=record,
        lms=[lm],
        on_retry=counter.on_retry if counter is not None else None,
        name="opro-sample",
    )
    failures = [o for o in outcomes if o is not None and not o.ok]
    ran = sum(o is not None for o in outcomes)
    if final or (failures and len(failures) == ran):
        last = final.get("outcome") or failures[-1]
        name = model or "the configured LM"
        why = (
            "failed with an error that retrying cannot fix"
            if final
            else f"is unavailable: all {ran} calls of the last round failed"
            + (f", each after {retries} retries" if retries else "")
        )
        error = PromptModelError(
            f"The prompt model {name!r} {why} (step {step}, {len(samples) - ran + len(failures)} of {total} samples "
            f"without a reply). Last error: {last.describe()}.",
            model=name,
            kind=last.kind,
            last_error=last.describe(),
        )
        error.partial = outcomes
        raise error
    return outcomes
