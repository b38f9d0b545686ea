"""OPRO: Optimization by PROmpting (Yang et al., 2023) as a DSPy optimizer: the teleprompter.

An optimizer model reads a meta-prompt holding the best instructions so far with their
scores and a few task examples, and proposes new instructions. Each step samples
``candidates_per_step`` proposals independently, scores the new ones on the training set
through the task model, and adds them to the history the next meta-prompt shows.

This module holds the `OPRO` class: its arguments (OPRO's own, the names COPRO, MIPROv2 and GEPA
users bring, the ``auto`` presets) and ``compile``, which checks a call's arguments and hands the
run to `dspy_opro.loop.InstructionRun`; the module docstring there follows a candidate from its
proposal to its score.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from . import compat
from .candidates import DEFAULT_MAX_LENGTH
from .exemplars import EXEMPLAR_STRATEGIES
from .families import check_family, meta_prompt_family
from .loop import InstructionRun, RunDeclinedError
from .meta_prompt import FAMILIES
from .models import optimizer_model, resolve_lm
from .run import check_int, check_temperature, take_renamed
from .screening import check_schedule

logger = logging.getLogger(__name__)

RENAMED = {"max_instructions_in_prompt": "max_shown"}
"""OPRO's former argument names, accepted with a `DeprecationWarning` for one release."""

__all__ = ["OPRO", "RENAMED", "RunDeclinedError"]


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
        max_shown: How many of the best instructions the meta-prompt shows (default 20; formerly
            ``max_instructions_in_prompt``, still accepted with a `DeprecationWarning`).
        num_exemplars: Training examples shown in the meta-prompt (default 3). GEPA's
            ``reflection_minibatch_size``.
        exemplar_selection: ``"best_wrong"`` (the default: examples the current best program
            answers wrongly), or one of the reference's ``"random"`` (the paper's), ``"constant"``,
            ``"accumulative_most_frequent"`` and ``"current_most_frequent"`` (see
            `dspy_opro.exemplars`).
        temperature: Sampling temperature of the prompt model (default 1.0). COPRO's and
            MIPROv2's ``init_temperature``.
        meta_prompt: ``"auto"`` (the default: `dspy_opro.families.meta_prompt_family` picks
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
            cannot plausibly beat the best (see `dspy_opro.screening`); on by default (the README's
            Benchmarks section compares it with full scoring). ``False`` gives the paper's full scoring
            of every candidate. ``"minibatch"`` scores every candidate on one minibatch (the same
            examples for all) and on the rest of the set only when it beats the best program there,
            and the meta-prompt then shows every candidate's minibatch score: more steps for a budget.
            The best program is always chosen on full training-set scores. MIPROv2's
            ``compile(minibatch=...)``.
        show_estimates: Also show the prompt model the candidates that screening stopped early, with
            their minibatch scores (estimates). Off by default: the meta-prompt shows only scores
            measured on the whole training set. (Not used by ``screening="minibatch"``.)
        feedback: Show, beside each exemplar the current best program answers wrongly, that answer
            and the metric's feedback when it returns one (``dspy.Prediction(score=...,
            feedback=...)``, as GEPA metrics do). On by default; the paper shows answers only.
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
        max_shown: int = 20,
        num_exemplars: int | None = None,
        exemplar_selection: str = "best_wrong",
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
        screening: bool | str = True,
        show_estimates: bool = False,
        feedback: bool = True,
        show_progress: bool = True,
        verbose: bool = False,
        **dspy_args: Any,
    ):
        super().__init__()
        _check_metric_argument(metric)
        max_shown = take_renamed(dspy_args, RENAMED, max_shown=max_shown)["max_shown"]
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

        check_int("num_steps", num_steps, minimum=0)
        check_int("candidates_per_step", candidates_per_step, minimum=1)
        check_int("max_shown", max_shown, minimum=1)
        check_int("num_exemplars", num_exemplars, minimum=0)
        check_int("num_final_candidates", num_final_candidates, minimum=1)
        check_int("max_instruction_length", max_instruction_length, minimum=1)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            logger.info("OPRO drew seed=%d (seed=None); pass it as seed= to repeat this run", seed)
        check_int("seed", seed, minimum=None)
        for name, value in (("num_threads", num_threads), ("max_errors", max_errors)):
            if value is not None:
                check_int(name, value, minimum=1 if name == "num_threads" else 0)
        for name, value in (("max_metric_calls", max_metric_calls), ("max_full_evals", max_full_evals)):
            if value is not None:
                check_int(name, value, minimum=1)
        if exemplar_selection not in EXEMPLAR_STRATEGIES:
            raise ValueError(f"exemplar_selection must be one of {EXEMPLAR_STRATEGIES}, got {exemplar_selection!r}")
        check_family(meta_prompt, tuple(FAMILIES), auto=True)
        temperature = check_temperature(temperature)
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
        self.max_shown = max_shown
        self.num_exemplars = num_exemplars
        self.exemplar_selection = exemplar_selection
        self.temperature = temperature
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
        self.screening = check_schedule(screening)
        self.show_estimates = bool(show_estimates)
        self.feedback = bool(feedback)
        self.show_progress = show_progress
        self.verbose = bool(verbose)

    @classmethod
    def paper_defaults(cls, metric: Callable, **overrides: Any) -> OPRO:
        """OPRO as the paper runs it (`PAPER_SETTINGS`): any setting can still be changed by name.

        The paper's wording of the meta-prompt, 8 samples per step at temperature 1, the 20 best
        instructions shown in ascending order of score, 3 training exemplars drawn at random each
        step and shown with their answers only, and every candidate scored on the whole training set.
        """
        return cls(metric, **{**PAPER_SETTINGS, **overrides})

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
            run = InstructionRun(opt, student, trainset, valset)
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
                check_int(name, value, minimum=_INT_OVERRIDES[name])
            elif name == "screening":
                value = check_schedule(value)
            else:
                value = bool(value)
            setattr(opt, name, value)
        n_train, n_val = len(trainset), len(valset or [])
        if trials is not None:
            check_int("num_trials", trials, minimum=1)
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


PAPER_SETTINGS: dict[str, Any] = {
    "meta_prompt": "paper",
    "num_steps": 20,
    "candidates_per_step": 8,
    "temperature": 1.0,
    "max_shown": 20,
    "num_exemplars": 3,
    "exemplar_selection": "random",
    "screening": False,
    "feedback": False,
}
"""The settings of `OPRO.paper_defaults`: the OPRO paper's loop (Yang et al., 2023, section 5.1)."""

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
