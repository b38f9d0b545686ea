"""The arguments DSPy users bring from COPRO, MIPROv2 and GEPA, and what each means to OPRO.

One table decides every foreign argument name, so the constructor, ``compile`` and the README all
say the same thing:

- `ALIASES`: another optimizer's name for an OPRO setting (``breadth`` is ``candidates_per_step``).
  Each alias sets exactly one OPRO argument; giving it together with that argument (or with
  another alias of it) and a different value is an error.
- `NEUTRAL`: arguments accepted only in the value that asks for nothing OPRO does not do
  (``max_bootstrapped_demos=0``: OPRO optimizes instructions only). Any other value is refused
  with the reason and what to do instead.
- `NO_EFFECT`: arguments that are harmless for OPRO; they are accepted, documented here, and
  logged as having no effect when given.
- `REFUSED`: arguments of features OPRO does not have; refused with the reason and the OPRO
  argument closest to the job, if any.

Anything else is an unknown argument: a `TypeError` naming the closest OPRO arguments.

`AUTO_PRESETS` sizes ``auto="light" | "medium" | "heavy"`` in metric calls; `budget_for` turns a
preset (or GEPA's ``max_full_evals``, or MIPROv2's ``num_trials``) into ``max_metric_calls`` for
the training and validation sets of one ``compile`` call.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

INIT = "constructor"
COMPILE = "compile"
EVAL_KWARGS = "eval_kwargs"

FEW_SHOT_ADVICE = (
    "OPRO optimizes instructions only. For instructions and demonstrations, run a few-shot optimizer on "
    "OPRO's result: dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=4, max_labeled_demos=4)"
    ".compile(OPRO(metric=metric, ...).compile(program, trainset=train), trainset=train), or "
    "dspy.LabeledFewShot(k=4) for labelled demonstrations only"
)


@dataclass(frozen=True)
class Entry:
    """One of another optimizer's argument names, at one place.

    Attributes:
        name: The argument as the other optimizer spells it.
        where: `INIT` (constructor), `COMPILE` or `EVAL_KWARGS` (a key of COPRO's ``eval_kwargs``).
        sources: The optimizers that use the name.
    """

    name: str
    where: str
    sources: str


@dataclass(frozen=True)
class Alias(Entry):
    """Another optimizer's name for one OPRO argument: ``target``, read as ``meaning`` says."""

    target: str
    meaning: str = ""


@dataclass(frozen=True)
class Neutral(Entry):
    """An argument accepted only in the value that asks nothing of OPRO.

    Attributes:
        accepts: Whether a value is the accepted one.
        accepted: The accepted values, in words.
        reason: Why other values are refused, and what to do instead.
    """

    accepts: Callable[[Any], bool]
    accepted: str
    reason: str


@dataclass(frozen=True)
class Foreign(Entry):
    """An argument with no OPRO setting, harmless (`NO_EFFECT`) or refused (`REFUSED`); ``reason`` says
    why it has no effect, or why it is refused and what to use instead."""

    reason: str


ALIASES: tuple[Alias, ...] = (
    Alias("breadth", INIT, "COPRO", "candidates_per_step", "new candidates per step"),
    Alias("depth", INIT, "COPRO", "num_steps", "optimization steps (each step changes one predictor)"),
    Alias("init_temperature", INIT, "COPRO, MIPROv2", "temperature", "sampling temperature of the prompt model"),
    Alias("num_candidates", INIT, "MIPROv2", "candidates_per_step", "instruction candidates proposed per step"),
    Alias("reflection_lm", INIT, "GEPA", "prompt_model", "the model that proposes instructions"),
    Alias("reflection_minibatch_size", INIT, "GEPA", "num_exemplars", "training examples shown to the prompt model"),
    Alias(
        "num_trials", COMPILE, "MIPROv2", "max_metric_calls", "budget: (num_trials + 1) x len(trainset) + validation"
    ),
    Alias("minibatch", COMPILE, "MIPROv2", "screening", "score new candidates on growing minibatches first"),
    Alias("num_threads", EVAL_KWARGS, "COPRO", "num_threads", "threads for scoring and sampling"),
    Alias("display_progress", EVAL_KWARGS, "COPRO", "show_progress", "show the progress bar"),
    Alias("max_errors", EVAL_KWARGS, "COPRO", "max_errors", "failed examples tolerated per candidate"),
)

_ZERO_DEMOS = "0 or None"


def _no_demos(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0)


NEUTRAL: tuple[Neutral, ...] = tuple(
    Neutral(name, where, "MIPROv2", _no_demos, _ZERO_DEMOS, FEW_SHOT_ADVICE)
    for where in (INIT, COMPILE)
    for name in ("max_bootstrapped_demos", "max_labeled_demos")
) + (
    Neutral(
        "teacher_settings",
        INIT,
        "MIPROv2",
        lambda value: not value,
        "None or {}",
        "OPRO has no teacher: it bootstraps no demonstrations. " + FEW_SHOT_ADVICE,
    ),
    Neutral(
        "metric_threshold",
        INIT,
        "MIPROv2",
        lambda value: value is None,
        "None",
        "it filters bootstrapped demonstrations, which OPRO does not make. " + FEW_SHOT_ADVICE,
    ),
    Neutral(
        "teacher",
        COMPILE,
        "COPRO, MIPROv2, GEPA (Teleprompter.compile)",
        lambda value: value is None,
        "None",
        "a teacher only bootstraps demonstrations, which OPRO does not make. " + FEW_SHOT_ADVICE,
    ),
    Neutral(
        "component_selector",
        INIT,
        "GEPA",
        lambda value: value == "round_robin",
        "'round_robin'",
        "OPRO always works on the predictors in turn (block coordinate ascent), which is GEPA's 'round_robin'",
    ),
    Neutral(
        "use_merge",
        INIT,
        "GEPA",
        lambda value: value is False,
        "False",
        "OPRO has no merge of lineages: each step changes one predictor of the best program so far",
    ),
)

NO_EFFECT: tuple[Foreign, ...] = (
    Foreign(
        "minibatch_full_eval_steps",
        COMPILE,
        "MIPROv2",
        "OPRO scores every candidate that survives screening on the whole trainset, so there are no periodic "
        "full evaluations to schedule",
    ),
    Foreign(
        "provide_traceback",
        COMPILE,
        "MIPROv2",
        "OPRO reports the first failure of each candidate in its log and in the error that stops a run",
    ),
    Foreign("provide_traceback", EVAL_KWARGS, "COPRO", "as for MIPROv2's provide_traceback"),
    Foreign(
        "display_table",
        EVAL_KWARGS,
        "COPRO",
        "OPRO prints no tables; every candidate's score is in the result's candidate_programs",
    ),
)

_PROPOSER = (
    "it tunes MIPROv2's grounded proposer; OPRO's meta-prompt shows the scored instructions and a few training "
    "examples instead (see num_exemplars, exemplar_selection and task_description)"
)
_GEPA_SEARCH = "GEPA's reflective search has no counterpart in OPRO, which samples proposals from a scored history"
_TRACKERS = (
    "OPRO reports to trackers through DSPy's callbacks (every scoring pass fires on_evaluate_start/end under "
    "the compile call): use mlflow.dspy.autolog() or a dspy.utils.callback.BaseCallback"
)

REFUSED: tuple[Foreign, ...] = (
    Foreign(
        "minibatch_size",
        COMPILE,
        "MIPROv2",
        "OPRO sizes its screening minibatches itself (an eighth of trainset, at least 8 examples, doubling each "
        "round); pass minibatch=False (or screening=False) to score every candidate on the whole trainset",
    ),
    *(
        Foreign(name, COMPILE, "MIPROv2", _PROPOSER)
        for name in (
            "program_aware_proposer",
            "data_aware_proposer",
            "tip_aware_proposer",
            "fewshot_aware_proposer",
            "view_data_batch_size",
        )
    ),
    *(
        Foreign(name, INIT, "GEPA", _GEPA_SEARCH)
        for name in (
            "candidate_selection_strategy",
            "skip_perfect_score",
            "add_format_failure_as_feedback",
            "instruction_proposer",
            "code_proposer",
            "max_merge_invocations",
            "frontier_type",
            "track_best_outputs",
            "warn_on_score_mismatch",
            "gepa_kwargs",
        )
    ),
    Foreign(
        "perfect_score",
        INIT,
        "GEPA",
        "OPRO ranks candidates by their mean score and never skips examples that already score perfectly",
    ),
    Foreign(
        "failure_score",
        INIT,
        "GEPA",
        "OPRO has one failure policy (failed examples count against max_errors), not a failure score to set",
    ),
    Foreign("failure_score", EVAL_KWARGS, "COPRO", "as for GEPA's failure_score (see max_errors)"),
    *(Foreign(name, INIT, "GEPA", _TRACKERS) for name in ("use_wandb", "wandb_api_key", "wandb_init_kwargs")),
    Foreign("use_mlflow", INIT, "GEPA", _TRACKERS),
    *(
        Foreign(
            name,
            EVAL_KWARGS,
            "COPRO",
            "OPRO keeps every candidate's score in the result's candidate_programs and, with log_dir, its whole "
            "history as JSON",
        )
        for name in ("save_as_csv", "save_as_json")
    ),
    Foreign("devset", EVAL_KWARGS, "COPRO", "pass the examples to compile as trainset= (and valset=)"),
    Foreign("metric", EVAL_KWARGS, "COPRO", "pass the metric to OPRO(metric=...)"),
)

_WHERE_TEXT = {INIT: "OPRO(...)", COMPILE: "OPRO.compile(...)", EVAL_KWARGS: "compile(eval_kwargs=...)"}


def _index(entries) -> dict[tuple[str, str], Any]:
    return {(entry.where, entry.name): entry for entry in entries}


_ALIASES = _index(ALIASES)
_NEUTRAL = _index(NEUTRAL)
_NO_EFFECT = _index(NO_EFFECT)
_REFUSED = _index(REFUSED)


def translate(where: str, given: Mapping[str, Any], *, known: tuple[str, ...] = ()) -> dict[str, tuple[str, Any]]:
    """Map other optimizers' arguments to OPRO settings, refusing what OPRO cannot honour.

    A value of ``None`` counts as not given (it is every one of these arguments' "nothing").

    Args:
        where: `INIT`, `COMPILE` or `EVAL_KWARGS`.
        given: The arguments as passed (names OPRO does not define itself).
        known: OPRO's own argument names at this place, for the suggestions of an unknown name.

    Returns:
        OPRO argument name -> (the alias it came from, its value), for the aliases among ``given``.

    Raises:
        TypeError: An unknown argument (with the closest OPRO names).
        ValueError: A refused argument or value (with the reason), or two aliases of one setting
            with different values.
    """
    settings: dict[str, tuple[str, Any]] = {}
    for name, value in given.items():
        key = (where, name)
        if not any(key in table for table in (_ALIASES, _NEUTRAL, _NO_EFFECT, _REFUSED)):
            raise TypeError(_unknown(where, name, known))
        if value is None:
            continue
        if key in _ALIASES:
            target = _ALIASES[key].target
            if target in settings:
                check_conflict(settings[target][0], settings[target][1], name, value, target=target)
            settings[target] = (name, value)
        elif key in _NEUTRAL:
            entry = _NEUTRAL[key]
            if not entry.accepts(value):
                raise ValueError(
                    f"{name}={value!r} ({entry.sources}) is not supported by OPRO: {entry.reason}. "
                    f"Accepted: {name}={entry.accepted}."
                )
        elif key in _NO_EFFECT:
            if value:  # a false value asks for nothing, which is what OPRO does
                logger.warning("%s=%r has no effect in OPRO: %s.", name, value, _NO_EFFECT[key].reason)
        else:
            entry = _REFUSED[key]
            raise ValueError(f"{name} ({entry.sources}) is not supported by OPRO: {entry.reason}.")
    return settings


def _unknown(where: str, name: str, known: tuple[str, ...]) -> str:
    candidates = [*known, *(a.name for a in ALIASES if a.where == where)]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"{_WHERE_TEXT[where]} got an unexpected argument {name!r}.{hint} OPRO's arguments, and the COPRO, MIPROv2 "
        "and GEPA names it accepts, are listed in the OPRO docstring and the README's table."
    )


def check_conflict(name: str, value: Any, other: str, other_value: Any, *, target: str | None = None) -> None:
    """Raise if two arguments for one OPRO setting were both given with different values."""
    if value is not None and other_value is not None and value is not other_value and value != other_value:
        raise ValueError(
            f"{name}={value!r} and {other}={other_value!r} both set OPRO's {target or name}; pass one of them"
        )


# ------------------------------------------------------------------------------- auto presets
@dataclass(frozen=True)
class Preset:
    """What ``auto`` sets: the search shape and a metric-call budget.

    The budget is ``train_evals x len(trainset) + val_evals x len(valset)`` metric calls: as many
    calls as scoring ``train_evals`` programs on the whole training set, plus validating
    ``val_evals`` finalists.
    """

    candidates_per_step: int
    num_steps: int
    num_final_candidates: int
    train_evals: int
    val_evals: int

    def budget(self, n_train: int, n_val: int) -> int:
        return self.train_evals * n_train + self.val_evals * n_val


# One table for the presets. Each runs until its budget or its steps are spent, whichever comes first;
# with screening (the default) most candidates cost a minibatch only, so the budget buys about twice as
# many candidates as full scoring would.
AUTO_PRESETS: dict[str, Preset] = {
    "light": Preset(candidates_per_step=4, num_steps=10, num_final_candidates=3, train_evals=12, val_evals=3),
    "medium": Preset(candidates_per_step=8, num_steps=20, num_final_candidates=5, train_evals=32, val_evals=5),
    "heavy": Preset(candidates_per_step=8, num_steps=50, num_final_candidates=8, train_evals=80, val_evals=8),
}


def full_evals_budget(max_full_evals: int, n_train: int, n_val: int) -> int:
    """GEPA's ``max_full_evals`` as metric calls: that many evaluations of trainset plus valset."""
    return max_full_evals * (n_train + n_val)


def trials_budget(num_trials: int, n_train: int, n_val: int, num_final_candidates: int) -> int:
    """MIPROv2's ``num_trials`` as metric calls: the start and ``num_trials`` candidates on the whole
    trainset, plus validating ``num_final_candidates`` finalists."""
    return (num_trials + 1) * n_train + num_final_candidates * n_val


# ------------------------------------------------------------------------------- metrics
def metric_caller(metric: Callable) -> Callable[[Any, Any], Any]:
    """``metric`` as a two-argument function ``(example, prediction)``.

    DSPy's `dspy.Evaluate` calls metrics with two arguments, so metrics written for COPRO and
    MIPROv2 are used as they are. GEPA metrics take ``(gold, pred, trace, pred_name, pred_trace)``;
    when some of those have no default they are passed as ``None``, which is what GEPA passes for
    a score of the whole program (no trace, no predictor). Returned values are left as they are: a
    number, a bool, or a ``dspy.Prediction(score=..., feedback=...)``.

    Raises:
        TypeError: ``metric`` accepts none of ``(example, prediction)``,
            ``(example, prediction, trace)`` or GEPA's five arguments.
    """
    try:
        signature = inspect.signature(metric)
    except (TypeError, ValueError):  # some builtins and C callables have no signature: call them as DSPy does
        return metric
    for extra in (0, 1, 3):
        try:
            signature.bind(None, None, *([None] * extra))
        except TypeError:
            continue
        if extra == 0:
            return metric
        return functools.partial(_call_with_nones, metric, extra)
    raise TypeError(
        f"metric {getattr(metric, '__name__', metric)!r} must accept (example, prediction), "
        "(example, prediction, trace) or GEPA's (gold, pred, trace, pred_name, pred_trace); its signature is "
        f"{signature}"
    )


def _call_with_nones(metric: Callable, extra: int, example: Any, prediction: Any) -> Any:
    return metric(example, prediction, *([None] * extra))
