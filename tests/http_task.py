"""A small OPRO task served over real HTTP by the loopback server (`openai_server`), for the fault tests.

Questions "What is A plus B?". The task model (``openai/task-model``) answers right only when its
instruction holds the word the question needs: "number" when A is not a multiple of 3, "only"
when it is — so "Answer number." scores 66.7, "Answer only." 33.3 and "Answer number only." 100.

The prompt model (``openai/prompt-model``) reads the chat meta-prompt like a real optimizer: it
extends the best instruction shown (the last one) by one word. The i-th reply sent for a given
meta-prompt uses word i of `VOCABULARY`, whatever the order the requests arrive in, so a run
proposes the same set of instructions each step however its threads interleave, and a run that
stopped and resumed asks the server for exactly the replies it still lacks. The best candidate
is unique at every step (66.7, then 100), so the result does not depend on thread timing either.
"""

from __future__ import annotations

import re
import threading
from collections import Counter

import dspy
from openai_server import OpenAIServer, Request

from dspy_opro import OPRO
from dspy_opro.preflight import PROBE_PROMPT

VOCABULARY = ["number", "only", "please", "now", "kindly", "exactly", "clearly", "again"]
_QUESTION = re.compile(r"What is (\d+) plus (\d+)\?")
_SHOWN = re.compile(r"Instruction: (.*)\nScore: \d+")
_OBJECTIVE = "In adhering to this structure, your objective is: "
TASK_MODEL, PROMPT_MODEL = "task-model", "prompt-model"


def make_set(n: int, offset: int = 0) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"What is {a} plus {a + 4}?", answer=str(2 * a + 4)).with_inputs("question")
        for a in range(offset + 1, offset + n + 1)
    ]


def metric(example, prediction, trace=None) -> bool:
    return str(prediction.answer).strip() == example.answer


def is_probe(request: Request) -> bool:
    """The set-up check's one request per model before a run (`dspy_opro.preflight`)."""
    return PROBE_PROMPT in request.text


def is_prompt(request: Request) -> bool:
    """A request for proposals (the prompt model's set-up probe excluded)."""
    return request.body.get("model") == PROMPT_MODEL and not is_probe(request)


def instruction_of(request: Request) -> str:
    system = str(request.body["messages"][0].get("content") or "")
    return system.split(_OBJECTIVE)[-1].strip() if _OBJECTIVE in system else ""


def question_of(request: Request) -> str:
    match = _QUESTION.search(request.text)
    return match.group(0) if match else ""


def right_answer(question: str, instruction: str) -> bool:
    a = int(_QUESTION.search(question).group(1))
    return ("only" if a % 3 == 0 else "number") in instruction.lower()


class Replies:
    """The server's reply function: the task model and the prompt model described in the module docstring."""

    def __init__(self):
        self.sent: Counter = Counter()  # replies sent per meta-prompt
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> str:
        if is_probe(request):
            return "OK"
        if is_prompt(request):
            shown = _SHOWN.findall(request.text)
            with self._lock:
                k = self.sent[request.text]
                self.sent[request.text] += 1
            return f"<INS>{(shown[-1] if shown else 'Answer.').rstrip('.')} {VOCABULARY[k % len(VOCABULARY)]}.</INS>"
        question = question_of(request)
        a, b = map(int, _QUESTION.search(question).groups())
        answer = str(a + b) if right_answer(question, instruction_of(request)) else f"roughly {a + b + 1}"
        return f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"


def server() -> OpenAIServer:
    return OpenAIServer(Replies())


def lms(url: str, *, retries: int = 2, timeout: float = 1.0, cache: bool = False) -> tuple[dspy.LM, dspy.LM]:
    """(task model, prompt model) talking to the loopback server at ``url`` through litellm."""
    common = dict(api_base=url, api_key="test-key", engine="litellm", cache=cache, num_retries=retries, timeout=timeout)
    return dspy.LM(f"openai/{TASK_MODEL}", **common), dspy.LM(f"openai/{PROMPT_MODEL}", temperature=1.0, **common)


def make_opro(url: str, *, retries: int = 2, timeout: float = 1.0, cache: bool = False, **settings) -> OPRO:
    task, prompt = lms(url, retries=retries, timeout=timeout, cache=cache)
    config = dict(
        prompt_model=prompt,
        task_model=task,
        num_steps=2,
        candidates_per_step=3,
        num_threads=4,
        initial_instructions="Answer.",
        num_final_candidates=2,
        show_progress=False,
    )
    config.update(settings)
    return OPRO(metric, **config)


def outcome(program: dspy.Module) -> dict:
    """What a run found, independent of thread timing (candidate ids are not: samples finish in any order)."""
    chosen = program.candidate_programs[0]
    return {
        "chosen": (chosen["instruction"], chosen["score"], chosen["val_score"]),
        "candidates": sorted(
            (c["instruction"], c["score"], c["evaluated"], c["step"]) for c in program.candidate_programs
        ),
        "best_per_step": [t["best_score"] for t in program.trajectory],
        "metric_calls": program.call_counts["metric_calls"],
    }
