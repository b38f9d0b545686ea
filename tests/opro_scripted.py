"""Scripted task and optimizer models for the OPRO tests.

The task: "What is A plus B?" questions. The scripted task model answers a question
correctly only when its instruction contains the keyword the question's kind needs (even
A: "number", odd A: "only"), so the training score of an instruction is the share of
keywords it has. The scripted optimizer model reads the meta-prompt like a real one would:
it takes the best instruction shown (the last one, as the list is ascending) and proposes it
extended by one word, a different word per sample. Climbing to 100 therefore needs the
history to be fed back correctly over several steps.
"""

from __future__ import annotations

import re
import threading

import dspy

from dspy_opro.testing import ScriptedCall, scripted_lm

KEYWORDS = {0: "number", 1: "only"}
VOCABULARY = ["number", "carefully", "please", "exactly", "only", "briefly", "now", "clearly"]
_QUESTION = re.compile(r"What is (\d+) plus (\d+)\?")


def make_trainset(n: int = 12, offset: int = 0) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"What is {a} plus {a + 3}?", answer=str(2 * a + 3)).with_inputs("question")
        for a in range(offset + 1, offset + n + 1)
    ]


def metric(example, prediction, trace=None) -> bool:
    return str(prediction.answer).strip() == example.answer


def chat_reply(fields: dict[str, str]) -> str:
    """A reply in DSPy's ChatAdapter format."""
    body = "\n\n".join(f"[[ ## {name} ## ]]\n{value}" for name, value in fields.items())
    return f"{body}\n\n[[ ## completed ## ]]"


def instruction_of(call: ScriptedCall) -> str:
    """The signature instruction, which ChatAdapter puts at the end of the system message."""
    marker = "In adhering to this structure, your objective is: "
    return call.system.split(marker)[-1].strip() if marker in call.system else ""


def answer_for(question: str, instruction: str) -> str:
    a, b = map(int, _QUESTION.search(question).groups())
    needed = KEYWORDS[a % 2]
    return str(a + b) if needed in instruction.lower() else f"roughly {a + b + 1}"


def task_lm(*, fail_every: int = 0, delay: float = 0.0) -> dspy.LM:
    """The scripted task model; with ``fail_every=k`` it raises on questions whose A is a multiple of k."""

    def reply(call: ScriptedCall) -> str:
        question = _QUESTION.search(call.user)
        if fail_every and int(question.group(1)) % fail_every == 0:
            raise RuntimeError("scripted provider outage")
        return chat_reply({"answer": answer_for(question.group(0), instruction_of(call))})

    return scripted_lm(reply, model="scripted/task", delay=delay)


class ScriptedOptimizer:
    """The scripted optimizer model (see the module docstring).

    Samples of one meta-prompt are told apart by a per-prompt counter, so the set of
    proposals per step is fixed whatever the thread timing.
    """

    def __init__(self, *, fail_every: int = 0, garbage_every: int = 0, stop_at_step: int | None = None):
        self.fail_every = fail_every
        self.garbage_every = garbage_every
        self.stop_at_step = stop_at_step
        self.prompts: list[str] = []
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()

    def best_shown(self, prompt: str) -> str:
        shown = re.findall(r"Instruction: (.*)\nScore: \d+", prompt)
        return shown[-1] if shown else "Answer."

    def __call__(self, call: ScriptedCall) -> str:
        with self._lock:
            if call.user not in self._counters:
                self.prompts.append(call.user)
            k = self._counters.get(call.user, 0)
            self._counters[call.user] = k + 1
            distinct_prompts = len(self.prompts)
        if self.stop_at_step is not None and distinct_prompts >= self.stop_at_step:
            raise KeyboardInterrupt("simulated interruption")
        if self.fail_every and k % self.fail_every == self.fail_every - 1:
            raise RuntimeError("scripted optimizer outage")
        if self.garbage_every and k % self.garbage_every == self.garbage_every - 1:
            return "I am not sure what you mean by that.\n\nLet me think about scores."
        word = VOCABULARY[k % len(VOCABULARY)]
        return f"<INS>{self.best_shown(call.user).rstrip('.')} {word}.</INS>"

    def lm(self) -> dspy.LM:
        return scripted_lm(self, model="scripted/optimizer")


class TwoStageProgram(dspy.Module):
    """Extract the two numbers, then add them: two predictors with their own instructions."""

    def __init__(self):
        super().__init__()
        self.extract = dspy.Predict("question -> numbers")
        self.add = dspy.Predict("question, numbers -> answer")

    def forward(self, question):
        numbers = self.extract(question=question).numbers
        return self.add(question=question, numbers=numbers)


def two_stage_task_lm() -> dspy.LM:
    """``extract`` lists the numbers only if told to "list". ``add`` needs correctly listed
    numbers, and then gets odd A right anyway and even A only if told to "add": the first
    predictor's keyword is worth 50, the second's the other 50."""

    def reply(call: ScriptedCall) -> str:
        instruction = instruction_of(call).lower()
        a, b = map(int, _QUESTION.search(call.user).groups())
        if "[[ ## numbers ## ]]\n" in call.user:  # the add step sees the numbers as an input
            listed = re.search(r"\[\[ ## numbers ## \]\]\n(.*)", call.user).group(1).strip()
            ok = listed == f"{a} {b}" and (a % 2 == 1 or "add" in instruction)
            return chat_reply({"answer": str(a + b) if ok else "unknown"})
        return chat_reply({"numbers": f"{a} {b}" if "list" in instruction else "some numbers"})

    return scripted_lm(reply, model="scripted/task")


class TwoStageOptimizer(ScriptedOptimizer):
    """Proposes the keyword the predictor needs among other words."""

    def __call__(self, call: ScriptedCall) -> str:
        with self._lock:
            k = self._counters.get(call.user, 0)
            self._counters[call.user] = k + 1
            self.prompts.append(call.user)
        word = ["list", "add", "think", "check"][k % 4]
        return f"<INS>{self.best_shown(call.user).rstrip('.')} {word}.</INS>"
