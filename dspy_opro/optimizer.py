"""OPRO: Optimization by PROmpting (Yang et al., 2023) as a DSPy optimizer.

An optimizer model reads a meta-prompt holding the best instructions so far with their
scores and a few task examples, and proposes new instructions. Each step samples
``candidates_per_step`` proposals independently, scores the new ones on the training set
through the task model, and adds them to the history the next meta-prompt shows.

Programs with several predictors are optimized by block coordinate ascent: step ``s`` works
on predictor ``(s - 1) % P``. That predictor gets its own meta-prompt, built from its own
history and from the examples as it sees them (its inputs recorded from a run of the current
best program). Each candidate changes that one predictor; the others keep their current best
instructions, so one step costs ``candidates_per_step x len(trainset)`` metric calls whatever
the number of predictors, and nothing already scored is ever re-scored. A candidate replaces
the current best program only if it scores strictly higher on the training set.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter
from tqdm.auto import tqdm

from . import compat
from .calls import PromptModelError, RunStoppedError, TaskFailureError, retries_of, run_jobs, without_retries
from .candidates import DEFAULT_MAX_LENGTH, dedup_key, normalize_instruction, rejection_reason
from .events import report_evaluations
from .exemplars import EXEMPLAR_STRATEGIES, select_exemplars
from .faults import TRANSIENT
from .history import LEDGER_NAME, Candidate, Checkpoint, PendingStep, RunState, StepRecord, digest
from .meta_prompt import BASE_STOP, FAMILIES, Exemplar, extract_instruction, render_meta_prompt
from .models import (
    CallCounter,
    CallLedger,
    lm_name,
    meta_prompt_family,
    optimizer_model,
    resolve_lm,
    sample_one,
)
from .preflight import CheckReport, check_models
from .scoring import Evaluation, MetricError, Scorer, as_score
from .screening import example_order, first_batch_size, screen

logger = logging.getLogger(__name__)

MIN_TRAINSET_SIZE = 3
VALIDATION_SHARE = 4  # under a budget, validation takes at most 1/VALIDATION_SHARE of it
_ALL_PREDICTORS = "*"  # the `predictor` of the initial configuration shared by all predictors
_DETAILS = "details"  # the fingerprint's plain-data part, which only explains a refusal


class OPRO(Teleprompter):
    """Optimize the instructions of a DSPy program with OPRO.

    A drop-in replacement for ``dspy.COPRO``, ``dspy.MIPROv2`` (instruction-only) and ``dspy.GEPA``:
    their constructor and ``compile`` arguments are accepted under their own names (see
    `dspy_opro.compat` and the README's table), so changing the class name is enough::

        optimizer = OPRO(metric=my_metric, prompt_model="openai/gpt-4o-mini")
        optimized = optimizer.compile(program, trainset=train, valset=val)

    Args:
        metric: ``metric(example, prediction)`` returning a bool, a number in [0, 1] or a
            ``dspy.Prediction`` with a ``score`` (and, as GEPA metrics return, a ``feedback``).
            GEPA's ``metric(gold, pred, trace, pred_name, pred_trace)`` works as it is. Scores are
            shown to the optimizer model as integers from 0 to 100 (mean x 100).
        prompt_model: The model that proposes instructions: a ``dspy.LM`` or a litellm model
            string (``"openai/gpt-4o-mini"``, ``"ollama_chat/llama3"``, ``"local/smollm2"``).
            Defaults to ``dspy.settings.lm`` at compile time. GEPA's ``reflection_lm`` is accepted
            as this argument.
        task_model: The model that runs the program while scoring; same forms. Defaults to
            ``dspy.settings.lm``. Predictors with their own ``lm`` keep it.
        auto: ``"light"``, ``"medium"`` or ``"heavy"``: a preset of ``candidates_per_step``,
            ``num_steps``, ``num_final_candidates`` and a metric-call budget sized to the data
            (`dspy_opro.compat.AUTO_PRESETS`). At most one of ``auto``, ``max_metric_calls`` and
            ``max_full_evals``; the preset's settings may be repeated, not changed.
        num_steps: Optimization steps after scoring the initial instructions (default 20).
            COPRO's ``depth``.
        candidates_per_step: Independent samples from the prompt model per step (default 8).
            COPRO's ``breadth``, MIPROv2's ``num_candidates``.
        max_instructions_in_prompt: How many of the best instructions the meta-prompt shows.
        num_exemplars: Training examples shown in the meta-prompt (default 3). GEPA's
            ``reflection_minibatch_size``.
        exemplar_selection: ``"random"``, ``"constant"``, ``"accumulative_most_frequent"`` or
            ``"current_most_frequent"`` (see `dspy_opro.exemplars`).
        temperature: Sampling temperature of the prompt model (default 1.0). COPRO's and
            MIPROv2's ``init_temperature``.
        meta_prompt: ``"auto"`` (the default: `dspy_opro.models.meta_prompt_family` picks
            ``"base"`` for the embedded local models and text-completion LMs, ``"chat"``
            otherwise), ``"chat"`` (instruction-tuned optimizers), ``"paper"`` (the paper's
            wording) or ``"base"`` (pretrained/small models; sent as a plain text completion
            when the prompt model is a text-completion model). See `render_meta_prompt`.
        initial_instructions: ``None`` (each predictor's current instruction), a string or
            list of strings (for every predictor), or a dict from predictor name to a string
            or list of strings. All are scored before the first step.
        num_threads: Threads for scoring and sampling. Defaults to ``dspy.settings.num_threads``.
        max_errors: Failed runs (after their retries) tolerated while scoring one candidate,
            over all its screening rounds and repeats; past it the run stops with an error,
            after saving its history (see `dspy_opro.calls`). A failed example is never
            scored. Defaults to ``dspy.settings.max_errors``.
        max_metric_calls: Hard budget on scored (candidate, example) pairs, validation
            included. The run stops cleanly before exceeding it and returns the best so far.
            (Before the run the metric is also called once on a training example's own labels,
            to reject a metric that does not return a number before any LM call is spent.)
        max_full_evals: GEPA's budget form: ``max_metric_calls`` becomes ``max_full_evals x
            (len(trainset) + len(valset))`` for each compile call.
        seed: Seeds exemplar draws and the sampling rollout ids; a rerun with the same seed
            and the DSPy cache on repeats the same run. ``None`` draws a seed once (logged; see
            ``get_params()``).
        log_dir: Directory for the JSON history, rewritten atomically after every step. A
            ``compile`` with the same ``log_dir``, program, data and settings resumes the run.
        track_stats: Attach ``candidate_programs``, ``trial_logs``, ``trajectory``,
            ``call_counts``, ``total_calls`` and ``score`` to the returned program.
        num_final_candidates: How many of the best training candidates are re-scored on
            ``valset`` to choose the result (default 5); one of the places goes to the best
            starting instruction when it is not among them, so the result never validates worse
            than the start. Under ``max_metric_calls``, validation takes at most a quarter of the
            budget, so fewer finalists may be validated.
        max_instruction_length: Longer proposals are discarded (characters).
        instruction_filter: Optional ``filter(text) -> bool``; proposals for which it returns
            False are discarded (the reference drops digits on GSM8K, for example).
        task_description: A short description of the task for the ``"base"`` meta-prompt;
            derived from the predictor's signature by default.
        screening: Score new candidates on a growing minibatch and stop scoring those that
            cannot plausibly beat the best (see `dspy_opro.screening`); on by default, since it
            reached full scoring's held-out accuracy, within the noise, with half the metric calls
            in `benchmarks/optimizers.py`.
            ``False`` gives the paper's full scoring of every candidate. The best program is
            still chosen on full training-set scores. MIPROv2's ``compile(minibatch=...)``.
        show_progress: Show a progress bar over steps.
        verbose: Log at DEBUG level during ``compile`` (every meta-prompt, every unreadable
            reply), to stderr if no logging handler is configured.
        **dspy_args: COPRO's, MIPROv2's and GEPA's names for the arguments above, and their
            arguments that need no OPRO setting (e.g. ``max_bootstrapped_demos=0``). An argument
            OPRO cannot honour raises a `ValueError` with the reason; an unknown one a `TypeError`
            naming the closest OPRO arguments.
    """

    def __init__(
        self,
        metric: Callable,
        prompt_model: dspy.BaseLM | str | None = None,
        task_model: dspy.BaseLM | str | None = None,
        *,
        auto: str | None = None,
        num_steps: int | None = None,
        candidates_per_step: int | None = None,
        max_instructions_in_prompt: int = 20,
        num_exemplars: int | None = None,
        exemplar_selection: str = "random",
        temperature: float | None = None,
        meta_prompt: str = "auto",
        initial_instructions: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        num_threads: int | None = None,
        max_errors: int | None = None,
        max_metric_calls: int | None = None,
        max_full_evals: int | None = None,
        seed: int | None = 0,
        log_dir: str | None = None,
        track_stats: bool = True,
        num_final_candidates: int | None = None,
        max_instruction_length: int = DEFAULT_MAX_LENGTH,
        instruction_filter: Callable[[str], bool] | None = None,
        task_description: str | None = None,
        screening: bool = True,
        show_progress: bool = True,
        verbose: bool = False,
        **dspy_args: Any,
    ):
        super().__init__()
        _check_metric_argument(metric)
        given = {
            "prompt_model": prompt_model,
            "num_steps": num_steps,
            "candidates_per_step": candidates_per_step,
            "num_exemplars": num_exemplars,
            "temperature": temperature,
            "num_final_candidates": num_final_candidates,
        }
        for target, (alias, value) in compat.translate(compat.INIT, dspy_args, known=_own_arguments()).items():
            compat.check_conflict(target, given[target], alias, value)
            given[target] = value
        _apply_preset(auto, given, max_metric_calls=max_metric_calls, max_full_evals=max_full_evals)
        for name, default in _DEFAULTS.items():
            if given.get(name) is None:
                given[name] = default
        num_steps, candidates_per_step = given["num_steps"], given["candidates_per_step"]
        num_exemplars, num_final_candidates = given["num_exemplars"], given["num_final_candidates"]
        temperature, prompt_model = given["temperature"], given["prompt_model"]

        _check_int("num_steps", num_steps, minimum=0)
        _check_int("candidates_per_step", candidates_per_step, minimum=1)
        _check_int("max_instructions_in_prompt", max_instructions_in_prompt, minimum=1)
        _check_int("num_exemplars", num_exemplars, minimum=0)
        _check_int("num_final_candidates", num_final_candidates, minimum=1)
        _check_int("max_instruction_length", max_instruction_length, minimum=1)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            logger.info("OPRO drew seed=%d (seed=None); pass it as seed= to repeat this run", seed)
        _check_int("seed", seed, minimum=None)
        for name, value in (("num_threads", num_threads), ("max_errors", max_errors)):
            if value is not None:
                _check_int(name, value, minimum=1 if name == "num_threads" else 0)
        for name, value in (("max_metric_calls", max_metric_calls), ("max_full_evals", max_full_evals)):
            if value is not None:
                _check_int(name, value, minimum=1)
        if exemplar_selection not in EXEMPLAR_STRATEGIES:
            raise ValueError(f"exemplar_selection must be one of {EXEMPLAR_STRATEGIES}, got {exemplar_selection!r}")
        if meta_prompt != "auto" and meta_prompt not in FAMILIES:
            raise ValueError(f"meta_prompt must be one of {('auto', *FAMILIES)}, got {meta_prompt!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ValueError(f"temperature must be a number in [0, 2], got {temperature!r}")
        if instruction_filter is not None and not callable(instruction_filter):
            raise TypeError("instruction_filter must be a callable taking the instruction text")

        self.metric = metric
        if isinstance(prompt_model, str):  # built for its meta-prompt family: a small model gets a text LM
            self.prompt_model, _ = optimizer_model(prompt_model, family=meta_prompt, max_tokens=None)
        else:
            self.prompt_model = resolve_lm(prompt_model, role="prompt_model")
        self.task_model = resolve_lm(task_model, role="task_model")
        self.auto = auto
        self.num_steps = num_steps
        self.candidates_per_step = candidates_per_step
        self.max_instructions_in_prompt = max_instructions_in_prompt
        self.num_exemplars = num_exemplars
        self.exemplar_selection = exemplar_selection
        self.temperature = float(temperature)
        self.meta_prompt = meta_prompt
        self.initial_instructions = initial_instructions
        self.num_threads = num_threads
        self.max_errors = max_errors
        self.max_metric_calls = max_metric_calls
        self.max_full_evals = max_full_evals
        self.seed = seed
        self.log_dir = log_dir
        self.track_stats = track_stats
        self.num_final_candidates = num_final_candidates
        self.max_instruction_length = max_instruction_length
        self.instruction_filter = instruction_filter
        self.task_description = task_description
        self.screening = bool(screening)
        self.show_progress = show_progress
        self.verbose = bool(verbose)

    # ------------------------------------------------------------------ compile
    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: Sequence[dspy.Example] | None = None,
        eval_kwargs: Mapping[str, Any] | None = None,
        num_trials: int | None = None,
        seed: int | None = None,
        minibatch: bool | None = None,
        requires_permission_to_run: bool | None = None,
        max_bootstrapped_demos: int | None = None,
        max_labeled_demos: int | None = None,
        **dspy_kwargs: Any,
    ) -> dspy.Module:
        """Optimize the instructions of ``student``.

        Before the first metric call every model gets one cheap set-up request
        (`dspy_opro.preflight`): a model that cannot work (no or wrong API key, unknown model,
        no permission, rejected request) stops the run at once with `ModelCheckError`.

        Args:
            student: The program. It is not modified; a new program is returned.
            trainset: Examples (with inputs marked by ``with_inputs``) that candidates are
                scored on. One or two examples work, but give coarse scores (a warning says so);
                a few dozen is typical.
            teacher: Accepted as ``None`` only: OPRO bootstraps no demonstrations.
            valset: Optional held-out examples. When given, the ``num_final_candidates`` best
                candidates by training score, and the best starting instruction, are re-scored
                on it and the best there is returned. Without it the best training score wins;
                training scores tend to overstate held-out accuracy (by 5-20 points in the OPRO
                paper), so pass a valset when you can. No split of ``trainset`` is ever made silently.
            eval_kwargs: COPRO's settings for `dspy.Evaluate`: ``num_threads``,
                ``display_progress`` (the progress bar) and ``max_errors`` apply to this call;
                ``display_table`` and ``provide_traceback`` have no effect; others are refused.
            num_trials: MIPROv2's budget: at most ``(num_trials + 1) x len(trainset)`` metric
                calls for the search plus validating the finalists. Not with ``auto``,
                ``max_metric_calls`` or ``max_full_evals``.
            seed: This call's seed (MIPROv2); default: the optimizer's.
            minibatch: This call's ``screening`` (MIPROv2); default: the optimizer's.
            requires_permission_to_run: ``True`` shows the plan and its cost in calls and asks
                on stdin before anything is spent; anything but "y" raises `RunDeclinedError`.
            max_bootstrapped_demos: Accepted as 0 (or None) only: OPRO optimizes instructions.
            max_labeled_demos: Likewise.
            **dspy_kwargs: Other MIPROv2 ``compile`` arguments: accepted where harmless, refused
                with the reason otherwise (see `dspy_opro.compat`).

        Returns:
            A copy of ``student`` whose predictors carry the chosen instructions.
        """
        named = {
            "teacher": teacher,
            "num_trials": num_trials,
            "minibatch": minibatch,
            "max_bootstrapped_demos": max_bootstrapped_demos,
            "max_labeled_demos": max_labeled_demos,
        }
        known = tuple(name for name in inspect.signature(OPRO.compile).parameters if name not in ("self",))
        aliases = compat.translate(compat.COMPILE, {**named, **dspy_kwargs}, known=known)
        if eval_kwargs is not None and not isinstance(eval_kwargs, Mapping):
            raise TypeError(f"eval_kwargs must be a dict of dspy.Evaluate settings, got {type(eval_kwargs).__name__}")
        aliases.update(compat.translate(compat.EVAL_KWARGS, dict(eval_kwargs or {}), known=()))
        if seed is not None:
            aliases["seed"] = ("seed", seed)
        trainset = list(trainset)
        valset = None if valset is None else list(valset)
        opt = self._for_run({target: value for target, (_, value) in aliases.items()}, trainset, valset)
        with _verbose_logging(opt.verbose):
            run = _Run(opt, student, trainset, valset)
            if requires_permission_to_run:
                run.confirm()
            run.check_models()
            return run.execute()

    def _for_run(self, overrides: dict[str, Any], trainset: list, valset: list | None) -> OPRO:
        """The settings of one compile call: this optimizer with the call's overrides, its resolved
        meta-prompt family and its metric-call budget."""
        opt = copy.copy(self)
        trials = overrides.pop("max_metric_calls", None)
        for name, value in overrides.items():
            if name in _INT_OVERRIDES:
                _check_int(name, value, minimum=_INT_OVERRIDES[name])
            setattr(opt, name, value if name in _INT_OVERRIDES else bool(value))
        n_train, n_val = len(trainset), len(valset or [])
        if trials is not None:
            _check_int("num_trials", trials, minimum=1)
            fixed = [name for name in ("auto", "max_metric_calls", "max_full_evals") if getattr(self, name) is not None]
            if fixed:
                raise ValueError(
                    f"num_trials={trials} and {fixed[0]}={getattr(self, fixed[0])!r} both set the budget; pass one"
                )
            opt.max_metric_calls = compat.trials_budget(trials, n_train, n_val, self.num_final_candidates)
        elif self.auto is not None:
            opt.max_metric_calls = compat.AUTO_PRESETS[self.auto].budget(n_train, n_val)
        elif self.max_full_evals is not None:
            opt.max_metric_calls = compat.full_evals_budget(self.max_full_evals, n_train, n_val)
        if opt.max_metric_calls is not None:
            opt.max_metric_calls = max(1, opt.max_metric_calls)
        if self.meta_prompt == "auto":
            prompt_lm = self.prompt_model or dspy.settings.lm
            opt.meta_prompt = meta_prompt_family(prompt_lm) if prompt_lm is not None else "chat"
        return opt

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments under OPRO's names, LM objects included.

        ``OPRO(**optimizer.get_params())`` builds an optimizer with the same settings (the same
        ``dspy.LM`` objects, with their ``api_base``, ``temperature``, ``max_tokens``, ...).
        Arguments given under COPRO's, MIPROv2's or GEPA's names appear under OPRO's.
        """
        return {name: getattr(self, name) for name in _own_arguments()}


_INT_OVERRIDES = {"num_threads": 1, "max_errors": 0, "seed": None}  # per-call settings and their minimum
_DEFAULTS = {
    "num_steps": 20,
    "candidates_per_step": 8,
    "num_exemplars": 3,
    "temperature": 1.0,
    "num_final_candidates": 5,
}


@functools.cache
def _own_arguments() -> tuple[str, ...]:
    parameters = inspect.signature(OPRO.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD)


def _check_metric_argument(metric: Any) -> None:
    if isinstance(metric, dspy.BaseLM):
        raise TypeError(
            "OPRO's first argument is the metric, but a language model was given. COPRO takes (prompt_model, metric) "
            "in that order; pass them by name: OPRO(metric=my_metric, prompt_model=lm)"
        )
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(example, prediction), got {type(metric).__name__}")
    compat.metric_caller(metric)  # raises if it takes neither DSPy's nor GEPA's arguments


def _apply_preset(auto: str | None, given: dict[str, Any], *, max_metric_calls, max_full_evals) -> None:
    budgets = [
        f"{name}={value!r}"
        for name, value in (("auto", auto), ("max_metric_calls", max_metric_calls), ("max_full_evals", max_full_evals))
        if value is not None
    ]
    if len(budgets) > 1:
        raise ValueError(
            f"{' and '.join(budgets)} all set the budget; pass one of auto, max_metric_calls, max_full_evals"
        )
    if auto is None:
        return
    if auto not in compat.AUTO_PRESETS:
        raise ValueError(f"auto must be one of {tuple(compat.AUTO_PRESETS)} or None, got {auto!r}")
    preset = compat.AUTO_PRESETS[auto]
    for name in ("num_steps", "candidates_per_step", "num_final_candidates"):
        wanted = getattr(preset, name)
        if given.get(name) is not None and given[name] != wanted:
            raise ValueError(
                f"auto={auto!r} sets {name}={wanted}, but {name}={given[name]!r} was given; pass auto=None to set "
                f"{name} yourself (with max_metric_calls or max_full_evals for a budget)"
            )
        given[name] = wanted


@contextlib.contextmanager
def _verbose_logging(verbose: bool):
    """``verbose=True``: the package logs at DEBUG for the call, to stderr if nothing would show it."""
    if not verbose:
        yield
        return
    package = logging.getLogger(__name__.split(".")[0])
    level = package.level
    handler = None
    if not package.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        package.setLevel(level)
        if handler is not None:
            package.removeHandler(handler)


class RunDeclinedError(RuntimeError):
    """``compile(requires_permission_to_run=True)`` was not confirmed."""


def _check_int(name: str, value: Any, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _check_examples(name: str, examples: list) -> None:
    if not examples:
        raise ValueError(f"{name} has 0 examples; pass at least one (a few dozen is typical: scores are averages)")
    for i, example in enumerate(examples):
        if not isinstance(example, dspy.Example):
            raise TypeError(f"{name}[{i}] is a {type(example).__name__}, not a dspy.Example")
        if getattr(example, "_input_keys", None) is None:
            raise ValueError(
                f"{name}[{i}] has no input fields marked; build examples as "
                "dspy.Example(question=..., answer=...).with_inputs('question')"
            )


def _describe_task(predictor) -> str:
    signature = predictor.signature
    inputs = ", ".join(signature.input_fields)
    outputs = ", ".join(signature.output_fields)
    return f"given {inputs}, produce {outputs}"


def _differences(key: str, here: Any, saved: Any) -> str:
    """What differs between this run and the saved one, in words, for a refused resume ("" if unknown)."""
    if saved is None and here is not None and key != "valset":
        return ""  # a history written before details were kept
    if key == "settings":
        changed = [
            f"{name}: {here.get(name)!r} here, {saved.get(name)!r} in the file"
            for name in sorted(set(here) | set(saved))
            if here.get(name) != saved.get(name)
        ]
        return f" ({'; '.join(changed)})" if changed else ""
    if key in ("trainset", "valset"):
        if here is None or saved is None:
            return f" ({'none' if here is None else len(here)} examples here, {'none' if saved is None else len(saved)} in the file)"
        if len(here) != len(saved):
            return f" ({len(here)} examples here, {len(saved)} in the file)"
        first = next((j for j, (a, b) in enumerate(zip(here, saved, strict=True)) if a != b), None)
        return "" if first is None else f" (example {first} differs)"
    if key == "program":
        names_here, names_saved = [p[0] for p in here], [p[0] for p in saved]
        if names_here != names_saved:
            return f" (predictors {names_here} here, {names_saved} in the file)"
        for (name, inputs, outputs, instruction), (_, inputs_s, outputs_s, instruction_s) in zip(
            here, saved, strict=True
        ):
            if (inputs, outputs) != (inputs_s, outputs_s):
                fields = lambda i, o: f"{', '.join(i)} -> {', '.join(o)}"  # noqa: E731
                return (
                    f" (predictor {name!r}: {fields(inputs, outputs)} here, {fields(inputs_s, outputs_s)} in the file)"
                )
            if instruction != instruction_s:
                return f" (predictor {name!r}: instruction {instruction!r} here, {instruction_s!r} in the file)"
    return ""


class _Run:
    """One compile call: the state of the loop, kept off the optimizer so it can be reused."""

    def __init__(self, opt: OPRO, student: dspy.Module, trainset: list, valset: list | None):
        self.opt = opt
        if not isinstance(student, dspy.Module):
            raise TypeError(f"student must be a dspy.Module, got {type(student).__name__}")
        self.student = student
        self.names = [name for name, _ in student.named_predictors()]
        if not self.names:
            raise ValueError(
                "the program has no predictors (dspy.Predict, dspy.ChainOfThought, ...), so it has no "
                "instructions to optimize"
            )
        _check_examples("trainset", trainset)
        if valset is not None:
            _check_examples("valset", valset)
        if len(trainset) < MIN_TRAINSET_SIZE:
            logger.warning(
                "trainset has %d example(s): every score is one of %s, so most instructions will tie; a few dozen "
                "examples tell instructions apart",
                len(trainset),
                " / ".join(f"{100 * k / len(trainset):g}" for k in range(len(trainset) + 1)),
            )
        self.trainset, self.valset = trainset, valset
        self.predictors = dict(student.named_predictors())
        self.initial = self._initial_instructions()

        self.task_lm = opt.task_model or dspy.settings.lm
        self.prompt_lm = opt.prompt_model or dspy.settings.lm
        if self.prompt_lm is None:
            raise ValueError(
                "no prompt model: pass OPRO(prompt_model=...) (a dspy.LM or a litellm model string) or "
                "call dspy.configure(lm=...) first"
            )
        if self.task_lm is None and any(getattr(p, "lm", None) is None for p in self.predictors.values()):
            raise ValueError(
                "no task model: pass OPRO(task_model=...) (a dspy.LM or a litellm model string) or "
                "call dspy.configure(lm=...) first"
            )
        self.metric = compat.metric_caller(opt.metric)
        self._check_metric()

        self.num_threads = opt.num_threads or dspy.settings.num_threads or 1
        max_errors = opt.max_errors if opt.max_errors is not None else dspy.settings.max_errors
        self.checkpoint = Checkpoint(opt.log_dir) if opt.log_dir else None
        if self.checkpoint:
            self.checkpoint.check_writable()
        self.state = self._load_or_start()
        self.counts = self.state.counts
        self.ledger = self._open_ledger()
        tracker = dspy.settings.usage_tracker
        self.task_counter = CallCounter(self.counts.task, forward_to=tracker, ledger=self.ledger, role="task")
        self.prompt_counter = CallCounter(self.counts.prompt, forward_to=tracker, ledger=self.ledger, role="prompt")
        # OPRO retries transient failures itself, on LM copies making one request per call (dspy_opro.calls).
        self.prompt_calls = without_retries(self.prompt_lm)
        task_retries = retries_of(self.task_lm or next(p.lm for p in self.predictors.values() if p.lm is not None))
        self.scorer = Scorer(
            self.metric,
            task_lm=without_retries(self.task_lm),
            num_threads=self.num_threads,
            max_errors=max_errors,
            counts=self.counts,
            counter=self.task_counter,
            retries=task_retries,
        )
        self.budget_exhausted = False
        self.model_check = CheckReport()

    # ------------------------------------------------------------ set-up checks
    def check_models(self) -> None:
        """One cheap request per model before any metric call; a model that cannot work stops here.

        Skipped for a finished run reloaded from ``log_dir``, which calls no model.
        """
        if self.state.selection is not None and self.state.completed_steps >= self.opt.num_steps:
            return
        models = [("prompt_model", self.prompt_lm)]
        if any(getattr(p, "lm", None) is None for p in self.predictors.values()):
            models.append(("task_model", self.task_lm))
        models += [(f"predictor {name!r}", p.lm) for name, p in self.predictors.items() if getattr(p, "lm", None)]
        counters = {role: self.prompt_counter if role == "prompt_model" else self.task_counter for role, _ in models}
        self.model_check = check_models(models, num_threads=self.num_threads, counters=counters)

    def confirm(self) -> None:
        """Show the plan and its cost, and go on only if the user answers "y" on stdin."""
        plan = self.plan_text()
        try:
            answer = input(f"{plan}\nStart the run? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise RunDeclinedError(
                "the run was not confirmed, nothing was spent; pass requires_permission_to_run=False (the default) "
                "to run without asking"
            )

    def _initial_instructions(self) -> dict[str, list[str]]:
        spec = self.opt.initial_instructions
        current = {name: p.signature.instructions for name, p in self.predictors.items()}
        if spec is None:
            per_name: dict[str, Any] = {}
        elif isinstance(spec, str) or (isinstance(spec, Sequence) and not isinstance(spec, Mapping)):
            per_name = {name: spec for name in self.names}
        elif isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(self.names))
            if unknown:
                raise ValueError(
                    f"initial_instructions names unknown predictors {unknown}; the program has {self.names}"
                )
            per_name = dict(spec)
        else:
            raise TypeError("initial_instructions must be None, a string, a list of strings, or a dict of those")
        result = {}
        for name in self.names:
            given = per_name.get(name, [current[name]])
            given = [given] if isinstance(given, str) else list(given)
            if not given or not all(isinstance(text, str) for text in given):
                raise ValueError(f"initial_instructions for {name!r} must be a non-empty list of strings")
            unique = list(dict.fromkeys(given))
            result[name] = unique
        return result

    def _check_metric(self) -> None:
        """Call the metric once on a gold prediction: a wrong return type fails before any LM call."""
        example = self.trainset[0]
        labels = example.labels()
        if not len(labels):
            return
        try:
            value = self.metric(example, dspy.Prediction(**labels.toDict()))
        except Exception as exc:  # metrics may legitimately need fields a gold label lacks
            logger.debug("metric check on a gold prediction raised %r; checking again while scoring", exc)
            return
        try:
            as_score(value)
        except MetricError as exc:
            raise MetricError(f"{exc} (checked on trainset[0] with its own labels as the prediction)") from None

    def _fingerprint(self) -> dict[str, str]:
        program = [
            (name, list(p.signature.input_fields), list(p.signature.output_fields), p.signature.instructions)
            for name, p in self.predictors.items()
        ]
        examples = lambda data: [(e.toDict(), sorted(e._input_keys)) for e in data]  # noqa: E731
        opt = self.opt
        settings = {
            "meta_prompt": opt.meta_prompt,
            "candidates_per_step": opt.candidates_per_step,
            "max_instructions_in_prompt": opt.max_instructions_in_prompt,
            "num_exemplars": opt.num_exemplars,
            "exemplar_selection": opt.exemplar_selection,
            "temperature": opt.temperature,
            "seed": opt.seed,
            "initial_instructions": self.initial,
            "max_instruction_length": opt.max_instruction_length,
            "task_description": opt.task_description,
            "screening": opt.screening,
            "prompt_model": lm_name(self.prompt_lm),
            "task_model": lm_name(self.task_lm),
        }
        plain = lambda value: json.loads(json.dumps(value, default=repr))  # noqa: E731
        return {
            "program": digest(program),
            "trainset": digest(examples(self.trainset)),
            "valset": digest(None if self.valset is None else examples(self.valset)),
            "settings": digest(settings),
            # What the digests cover, so that a refused resume can say what differs (`_differences`).
            _DETAILS: {
                "program": plain(program),
                "trainset": [digest(e) for e in examples(self.trainset)],
                "valset": None if self.valset is None else [digest(e) for e in examples(self.valset)],
                "settings": plain(settings),
            },
        }

    def _load_or_start(self) -> RunState:
        fingerprint = self._fingerprint()
        if self.checkpoint is None:
            return RunState(fingerprint=fingerprint)
        state = self.checkpoint.load()
        if state is None:
            return RunState(fingerprint=fingerprint)
        differing = [key for key in fingerprint if key != _DETAILS and state.fingerprint.get(key) != fingerprint[key]]
        if differing:
            saved = state.fingerprint.get(_DETAILS) or {}
            parts = [
                f"a different {key}{_differences(key, fingerprint[_DETAILS].get(key), saved.get(key))}"
                for key in differing
            ]
            raise ValueError(
                f"{str(self.checkpoint.path)!r} holds an OPRO run with {' and '.join(parts)}; refusing to resume it. "
                f"Use a new log_dir for this run, or delete that file (and {LEDGER_NAME}) to start over."
            )
        logger.info(
            "Resuming OPRO from %s: %d candidates scored, %d steps done%s",
            self.checkpoint.path,
            len(state.candidates),
            state.completed_steps,
            f", step {state.pending.step} to finish" if state.pending is not None else "",
        )
        return state

    def _open_ledger(self) -> CallLedger | None:
        """The call ledger in log_dir; the counts it holds (calls after the last save included) replace the saved ones."""
        if self.checkpoint is None:
            return None
        ledger = CallLedger(self.checkpoint.dir / LEDGER_NAME)
        run = digest({key: value for key, value in self.state.fingerprint.items() if key != _DETAILS})
        totals = ledger.open(run)
        if totals is not None:
            self.state.counts.task = totals.get("task", self.state.counts.task)
            self.state.counts.prompt = totals.get("prompt", self.state.counts.prompt)
        else:  # a new ledger (or a history without one): it starts from the saved counts
            for role, stats in (("task", self.state.counts.task), ("prompt", self.state.counts.prompt)):
                if stats.calls:
                    ledger.write_base(role, stats)
        return ledger

    # -------------------------------------------------------------- the loop
    def execute(self) -> dspy.Module:
        self._log_plan()
        bar = None
        try:
            if not self.state.steps:
                self._score_initial()
            first_step = self.state.completed_steps + 1
            bar = tqdm(
                total=self.opt.num_steps,
                initial=min(first_step - 1, self.opt.num_steps),
                desc="OPRO",
                unit="step",
                disable=not self.opt.show_progress,
            )
            bar.set_postfix(best=f"{self.state.best.score:.1f}")
            for step in range(first_step, self.opt.num_steps + 1):
                started = self._pending(step) is not None  # its budget was settled when it started
                if not started and self._loop_budget() < len(self.trainset):
                    self._stop_for_budget(step)
                    break
                self._step(step)
                bar.update(1)
                bar.set_postfix(best=f"{self.state.best.score:.1f}")
                if self.budget_exhausted:
                    break
            chosen = self._select()
            self._save()
        finally:
            if bar is not None:
                bar.close()
            if self.ledger is not None:
                self.ledger.close()
        return self._result(chosen)

    def _pending(self, step: int) -> PendingStep | None:
        """The saved state of ``step`` if a stopped run left it unfinished."""
        pending = self.state.pending
        return pending if pending is not None and pending.step == step else None

    def _stopped(self, error: RunStoppedError) -> None:
        """Save everything measured before ``error`` stopped the run, and say where it is."""
        self._save()
        if self.checkpoint is not None:
            error.saved_to = str(self.checkpoint.path)
        else:
            error.unsaved = True
        logger.error("OPRO stopped: %s", error)

    def _log_plan(self) -> None:
        logger.info("%s", self.plan_text())

    def plan_text(self) -> str:
        """The run's plan and its cost in calls: what ``requires_permission_to_run`` shows and the log states."""
        n_train, opt = len(self.trainset), self.opt
        initial = sum(len(v) for v in self.initial.values()) - (len(self.names) - 1)
        per_step = opt.candidates_per_step * n_train
        validation = min(self.num_finalists, 1 + opt.num_steps * opt.candidates_per_step) * len(self.valset or [])
        total = initial * n_train + opt.num_steps * per_step + validation
        if opt.max_metric_calls:
            total = min(total, opt.max_metric_calls)
        models = [self.prompt_lm, self.task_lm, *(getattr(p, "lm", None) for p in self.predictors.values())]
        checks = len({id(lm) for lm in models if lm is not None})
        return (
            f"OPRO plan: {len(self.names)} predictor(s), {n_train} training and {len(self.valset or [])} validation "
            f"examples, {self.num_threads} threads, {opt.meta_prompt!r} meta-prompt. Initial instructions: {initial} x "
            f"{n_train} = {initial * n_train} metric calls. Each step: {opt.candidates_per_step} prompt-model calls, "
            f"then up to {opt.candidates_per_step} new candidates x {n_train} examples = {per_step} metric calls. "
            f"{opt.num_steps} steps: at most {total} metric calls in total"
            f"{f' (max_metric_calls={opt.max_metric_calls})' if opt.max_metric_calls else ''}"
            f"{', usually far fewer: screening stops scoring hopeless candidates early' if opt.screening else ''}. "
            f"Cost: at most {opt.num_steps * opt.candidates_per_step} prompt-model calls and about "
            f"{total * len(self.names)} task-model calls ({len(self.names)} per metric call), plus at most {checks} "
            "set-up check call(s)."
        )

    @property
    def num_finalists(self) -> int:
        """Candidates validated at the end: ``num_final_candidates``, within a quarter of the budget."""
        if self.valset is None or self.opt.max_metric_calls is None:
            return self.opt.num_final_candidates
        affordable = self.opt.max_metric_calls // VALIDATION_SHARE // len(self.valset)
        return max(1, min(self.opt.num_final_candidates, affordable))

    def _validation_reserve(self) -> int:
        return 0 if self.valset is None else self.num_finalists * len(self.valset)

    def _loop_budget(self) -> float:
        """Metric calls still available to the optimization loop."""
        if self.opt.max_metric_calls is None:
            return float("inf")
        return self.opt.max_metric_calls - self._validation_reserve() - self.counts.metric_calls

    def _stop_for_budget(self, step: int) -> None:
        self.budget_exhausted = True
        logger.info(
            "Stopping before step %d: max_metric_calls=%d leaves too little for another candidate "
            "(%d metric calls spent, %d kept for validation).",
            step,
            self.opt.max_metric_calls,
            self.counts.metric_calls,
            self._validation_reserve(),
        )

    def _program(self, instructions: Mapping[str, str]) -> dspy.Module:
        program = self.student.deepcopy()
        for name, predictor in program.named_predictors():
            predictor.signature = predictor.signature.with_instructions(instructions[name])
        return program

    def _scoring_program(self, instructions: Mapping[str, str]) -> dspy.Module:
        """The program to score: predictors with their own LM get a copy making one request per call."""
        program = self._program(instructions)
        for predictor in program.predictors():
            if predictor.lm is not None:
                predictor.lm = without_retries(predictor.lm)
        return program

    def _score(
        self,
        configs: list[dict[str, str]],
        *,
        screened: bool = False,
        max_calls: int | None = None,
        known: list[Evaluation | None] | None = None,
    ) -> list[Evaluation]:
        programs = [self._scoring_program(config) for config in configs]
        if not screened:
            return self._report(
                programs,
                self.trainset,
                self.scorer.evaluate(programs, self.trainset, capture_traces=True, known=known),
            )
        evaluations = screen(
            self.scorer,
            programs,
            self.trainset,
            threshold=self.state.best.score / 100,
            order=example_order(len(self.trainset), self.opt.seed),
            max_calls=max_calls,
            known=known,
        )
        return self._report(programs, self.trainset, evaluations)

    def _report(
        self, programs: list[dspy.Module], examples: list, evaluations: list[Evaluation], *, validation: bool = False
    ) -> list[Evaluation]:
        """Fire DSPy's evaluate callbacks for a finished scoring pass (see `dspy_opro.events`)."""
        report_evaluations(
            programs, examples, evaluations, metric=self.opt.metric, num_threads=self.num_threads, validation=validation
        )
        return evaluations

    def _score_pending(self, pending: PendingStep, *, screened: bool) -> list[Evaluation]:
        """Score the step's candidates, starting from what a stopped run measured; on a stop, save and raise."""
        known = None
        if pending.evaluations is not None:
            known = [None if e is None else Evaluation.from_json(e) for e in pending.evaluations]
        configs = [config for _, config in pending.configs]
        try:
            return self._score(configs, screened=screened, max_calls=pending.budget, known=known)
        except TaskFailureError as exc:
            pending.evaluations = [e.to_json() for e in exc.partial]
            self._stopped(exc)
            raise

    def _add(self, step: int, predictor: str, config: dict[str, str], evaluation: Evaluation) -> Candidate:
        assert not evaluation.failed, "a step ends only when every failed example was run again"
        candidate = Candidate(
            id=len(self.state.candidates),
            step=step,
            predictor=predictor,
            instruction=config[predictor] if predictor in config else config[self.names[0]],
            instructions=dict(config),
            score=evaluation.score,
            per_example=[None if s is None else round(s, 6) for s in evaluation.scores],
            failures=evaluation.failures,
            evaluated=evaluation.evaluated,
            program_errors=sorted(evaluation.program_errors),
        )
        self.state.candidates.append(candidate)
        best = self.state.best
        if self._usable(candidate) and (best is None or candidate.score > best.score):
            self.state.best_id = candidate.id
            self.state.best_traces = evaluation.traces or []
        if candidate.program_errors:
            logger.warning(
                "Candidate %d is left out: the program or the metric raised on %d example(s); first: %s",
                candidate.id,
                len(candidate.program_errors),
                evaluation.first_error,
            )
        return candidate

    def _usable(self, candidate: Candidate) -> bool:
        """Scored on the whole training set with no failure: it may be the best, a finalist, the result."""
        return candidate.complete and candidate.evaluated == len(self.trainset)

    def _score_initial(self) -> None:
        pending = self._pending(0)
        if pending is None:
            base = {name: texts[0] for name, texts in self.initial.items()}
            configs = [(self.names[0] if len(self.names) == 1 else _ALL_PREDICTORS, base)]
            for name, texts in self.initial.items():
                configs += [(name, {**base, name: text}) for text in texts[1:]]
            need = len(configs) * len(self.trainset)
            if self._loop_budget() < need:
                raise ValueError(
                    f"max_metric_calls={self.opt.max_metric_calls} cannot cover scoring the {len(configs)} initial "
                    f"instruction(s) on {len(self.trainset)} examples ({need} calls) plus validation "
                    f"({self._validation_reserve()} calls); raise it or use fewer examples"
                )
            pending = PendingStep(0, "", [], "", configs=configs)
            self.state.pending = pending
        evaluations = self._score_pending(pending, screened=False)
        if not any(e.complete for e in evaluations):
            # Nothing to start from: keep the step pending (a rerun after a fix re-scores what failed).
            pending.evaluations = [e.to_json() for e in evaluations]
            first = next(e.first_error for e in evaluations if e.first_error)
            error = TaskFailureError(
                f"None of the {len(evaluations)} initial instruction(s) could be scored on every training example: "
                f"the program or the metric raised (first: {first}). A failed example is never counted as a "
                "score; make the program and the metric handle every example (return 0 for an answer the metric "
                "cannot read), then run again.",
                kind="program",
                last_error=first,
            )
            self._stopped(error)
            raise error
        for (predictor, config), evaluation in zip(pending.configs, evaluations, strict=True):
            self._add(0, predictor, config, evaluation)
        best = self.state.best
        self.state.steps.append(
            StepRecord(0, "", [], "", 0, [c.id for c in self.state.candidates], best.score, best.id)
        )
        self.state.pending = None
        self._save()
        logger.info("Initial instructions scored; best %.1f: %r", best.score, best.instruction)

    def _history_of(self, name: str, *, all_of_them: bool = False) -> list[Candidate]:
        """The candidates of predictor ``name``; only the complete ones (those the meta-prompt shows) by default."""
        return [
            c for c in self.state.candidates if c.predictor in (name, _ALL_PREDICTORS) and (all_of_them or c.complete)
        ]

    def _exemplars(self, step: int, index: int, name: str, history: list[Candidate]) -> list[int]:
        def wrong(candidates):
            counter: Counter = Counter()
            for candidate in candidates:
                counter.update(j for j, s in enumerate(candidate.per_example) if s is not None and s < 1.0)
            return counter

        shown = sorted(history, key=lambda c: c.score)[-self.opt.max_instructions_in_prompt :]
        return select_exemplars(
            self.opt.exemplar_selection,
            n_examples=len(self.trainset),
            k=self.opt.num_exemplars,
            seed=self.opt.seed,
            step=step,
            wrong_ever=wrong(history),
            wrong_current=wrong(shown),
            salt=str(index) if len(self.names) > 1 else "",
        )

    def _exemplar(self, j: int, name: str) -> Exemplar:
        example = self.trainset[j]
        traced = self.state.best_traces[j].get(name) if j < len(self.state.best_traces) else None
        inputs = traced or {k: str(v) for k, v in example.inputs().items()}
        answer = {k: str(v) for k, v in example.labels().items()}
        return Exemplar(inputs=inputs, answer=answer)

    def meta_prompt_for(self, step: int, index: int) -> tuple[str, list[int]]:
        """The meta-prompt of ``step`` for predictor ``index``, and the exemplar indices it shows."""
        name = self.names[index]
        history = self._history_of(name)
        chosen = self._exemplars(step, index, name, history)
        task = self.opt.task_description or _describe_task(self.predictors[name])
        text = render_meta_prompt(
            self.opt.meta_prompt,
            [(c.instructions[name], c.score) for c in history],
            [self._exemplar(j, name) for j in chosen],
            max_instructions=self.opt.max_instructions_in_prompt,
            task_description=task,
        )
        return text, chosen

    def _propose(self, step: int, index: int, replies: list[str]) -> list[str]:
        name = self.names[index]
        seen = {dedup_key(c.instructions[name]) for c in self._history_of(name, all_of_them=True)}
        accepted = []
        for reply in replies:
            self.counts.proposals += 1
            extracted = extract_instruction(self.opt.meta_prompt, reply)
            if extracted is None:
                self.counts.unparsed += 1
                logger.debug("No instruction found in reply at step %d: %r", step, reply[:200])
                continue
            text = normalize_instruction(extracted)
            reason = rejection_reason(
                text, max_length=self.opt.max_instruction_length, extra_filter=self.opt.instruction_filter
            )
            if reason is not None:
                self.counts.rejected[reason] = self.counts.rejected.get(reason, 0) + 1
                continue
            key = dedup_key(text)
            if key in seen:
                self.counts.duplicates += 1
                continue
            seen.add(key)
            accepted.append(text)
        return accepted

    def _sample(self, pending: PendingStep, index: int) -> None:
        """Fill in the step's missing replies: transient failures are asked again while some calls succeed.

        Stops with `PromptModelError`, after saving, at a fatal error or when a whole round fails.
        """
        stop = [BASE_STOP] if self.opt.meta_prompt == "base" else None
        key = (self.opt.seed, pending.step, index)
        while True:
            missing = [i for i, reply in enumerate(pending.replies) if reply is None]
            if not missing:
                return
            final: dict[str, Any] = {}

            def record(k, outcome, missing=missing, final=final) -> bool:
                if outcome.ok:
                    pending.replies[missing[k]] = outcome.value
                    return False
                logger.warning("Prompt model call failed at step %d: %s", pending.step, outcome.describe())
                if outcome.kind != TRANSIENT:  # retrying cannot fix it
                    final.setdefault("outcome", outcome)
                return bool(final)

            jobs = [
                functools.partial(
                    sample_one,
                    self.prompt_calls,
                    pending.meta_prompt,
                    i,
                    temperature=self.opt.temperature,
                    key=key,
                    counter=self.prompt_counter,
                    stop=stop,
                )
                for i in missing
            ]
            outcomes = run_jobs(
                jobs,
                num_threads=self.num_threads,
                retries=retries_of(self.prompt_lm),
                on_outcome=record,
                lms=[self.prompt_calls],
                on_retry=self.prompt_counter.on_retry,
                name="opro-sample",
            )
            failures = [o for o in outcomes if o is not None and not o.ok]
            ran = sum(o is not None for o in outcomes)
            if final or (failures and len(failures) == ran):
                last = final.get("outcome") or failures[-1]
                model = lm_name(self.prompt_lm)
                why = (
                    "failed with an error that retrying cannot fix"
                    if final
                    else f"is unavailable: all {ran} calls of the last round failed"
                    + (f", each after {retries_of(self.prompt_lm)} retries" if retries_of(self.prompt_lm) else "")
                )
                error = PromptModelError(
                    f"The prompt model {model!r} {why} (step {pending.step}, {len(missing) - ran + len(failures)} of "
                    f"{len(pending.replies)} samples without a reply). Last error: {last.describe()}.",
                    model=model,
                    kind=last.kind,
                    last_error=last.describe(),
                )
                self._stopped(error)
                raise error

    def _step(self, step: int) -> None:
        """Run one step (or finish the one a stopped run left); the step is saved only once it is complete."""
        index = (step - 1) % len(self.names)
        name = self.names[index]
        pending = self._pending(step)
        if pending is None:
            text, chosen = self.meta_prompt_for(step, index)
            logger.debug("Meta-prompt at step %d for %s:\n%s", step, name, text)
            pending = PendingStep(step, name, chosen, text, replies=[None] * self.opt.candidates_per_step)
            self.state.pending = pending
        self._sample(pending, index)
        if pending.configs is None:
            proposals = self._propose(step, index, pending.replies)
            budget = self._loop_budget()
            # A screened candidate may cost only the first minibatch; `screen` then keeps within the budget.
            cost = first_batch_size(len(self.trainset)) if self.opt.screening else len(self.trainset)
            affordable = len(proposals) if budget == float("inf") else int(budget // cost)
            if affordable < len(proposals):
                proposals = proposals[:affordable]
                pending.final = True
                logger.info(
                    "max_metric_calls reached: scoring %d candidate(s) at step %d, then stopping", affordable, step
                )
            base = self.state.best.instructions
            pending.configs = [(name, {**base, name: proposal}) for proposal in proposals]
            pending.budget = None if budget == float("inf") else int(budget)
        evaluations = self._score_pending(pending, screened=self.opt.screening) if pending.configs else []
        new = [
            self._add(step, name, config, evaluation)
            for (_, config), evaluation in zip(pending.configs, evaluations, strict=True)
        ]
        best = self.state.best
        self.state.steps.append(
            StepRecord(
                step,
                name,
                pending.exemplars,
                pending.meta_prompt,
                len(pending.replies),
                [c.id for c in new],
                best.score,
                best.id,
            )
        )
        self.state.pending = None
        self.budget_exhausted = self.budget_exhausted or pending.final
        self._save()
        logger.info(
            "Step %d (%s): %d new candidate(s)%s; best %.1f",
            step,
            name,
            len(new),
            f" scoring {', '.join(f'{c.score:.1f}' for c in new)}" if new else "",
            best.score,
        )

    # --------------------------------------------------------- final choice
    def _select(self) -> Candidate:
        candidates = self.state.candidates
        if self.valset is None:
            self.state.selection = {"on": "trainset", "chosen": self.state.best_id}
            return self.state.best
        ranked, seen = [], set()
        for candidate in sorted(filter(self._usable, candidates), key=lambda c: (-c.score, c.id)):
            key = tuple(sorted(candidate.instructions.items()))
            if key not in seen:
                seen.add(key)
                ranked.append(candidate)
        finalists = ranked[: self.num_finalists]
        # The best starting configuration is always validated when there are two or more places: the result
        # is then never a program that does worse on validation than the one the run started from.
        start = next((c for c in ranked if c.step == 0), None)
        if start is not None and start not in finalists and len(finalists) >= 2:
            finalists = finalists[:-1] + [start]
        ids = [c.id for c in finalists]
        plan = self.state.selection or {}
        if plan.get("finalists") == ids and "validating" in plan:
            todo = [candidates[i] for i in plan["validating"]]  # a stopped validation: same plan, same budget
        else:
            todo = [c for c in finalists if not (c.validation or {}).get("done")]
            if self.opt.max_metric_calls is not None:
                room = (self.opt.max_metric_calls - self.counts.metric_calls) // len(self.valset)
                skipped = todo[max(room, 0) :]
                todo = todo[: max(room, 0)]
                if skipped:
                    logger.warning("max_metric_calls leaves no room to validate %d finalist(s)", len(skipped))
            self.state.selection = {"on": "valset", "finalists": ids, "validating": [c.id for c in todo]}
        if todo:
            self._validate(todo)
        validated = [c for c in finalists if c.val_score is not None]
        chosen = max(validated, key=lambda c: (c.val_score, c.score, -c.id)) if validated else self.state.best
        self.state.selection = {"on": "valset", "finalists": ids, "chosen": chosen.id}
        logger.info(
            "Chose candidate %d: train %.1f, validation %s",
            chosen.id,
            chosen.score,
            "n/a" if chosen.val_score is None else f"{chosen.val_score:.1f}",
        )
        return chosen

    def _validate(self, todo: list[Candidate]) -> None:
        """Score ``todo`` on the valset; ``val_score`` only for those scored on every example."""
        programs = [self._scoring_program(c.instructions) for c in todo]
        known = [None if c.validation is None else Evaluation.from_json(c.validation) for c in todo]
        try:
            evaluations = self._report(
                programs, self.valset, self.scorer.evaluate(programs, self.valset, known=known), validation=True
            )
        except TaskFailureError as exc:
            for candidate, evaluation in zip(todo, exc.partial, strict=True):
                candidate.validation = evaluation.to_json()
            self._stopped(exc)
            raise
        for candidate, evaluation in zip(todo, evaluations, strict=True):
            candidate.validation = {**evaluation.to_json(), "done": True}
            candidate.val_score = evaluation.score if evaluation.complete else None
            if not evaluation.complete:
                logger.warning(
                    "Finalist %d is left out: the program or the metric raised on %d validation example(s); first: %s",
                    candidate.id,
                    len(evaluation.program_errors),
                    evaluation.first_error,
                )

    def _save(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.save(self.state)

    def _result(self, chosen: Candidate) -> dspy.Module:
        program = self._program(chosen.instructions)
        if not self.opt.track_stats:
            return program
        others = sorted(
            (c for c in self.state.candidates if c.id != chosen.id),
            key=lambda c: (c.val_score if c.val_score is not None else -1.0, c.score),
            reverse=True,
        )
        # Each entry also carries its program, as COPRO's and MIPROv2's do (a list of dicts, so the programs
        # never become predictors of the returned program).
        program.candidate_programs = [
            {**c.summary(), "program": self._program(c.instructions)} for c in [chosen, *others]
        ]
        program.trial_logs = [asdict(s) for s in self.state.steps]
        program.trajectory = [
            {
                "step": s.step,
                "predictor": s.predictor,
                "best_score": s.best_score,
                "candidate_scores": [self.state.candidates[i].score for i in s.new_candidates],
            }
            for s in self.state.steps
        ]
        program.call_counts = {**self.counts.as_dict(), "preflight": self.model_check.as_dict()}
        program.total_calls = self.counts.metric_calls  # COPRO's and MIPROv2's name for the metric calls spent
        program.score = chosen.val_score if chosen.val_score is not None else chosen.score
        return program
