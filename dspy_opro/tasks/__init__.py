"""Task data and answer checking: the OPRO paper's benchmarks (GSM8K, BIG-Bench Hard) and a suite of
instruction-sensitive tasks generated in code (`SUITE`).

Loaders read the original release files from a directory when given one (offline), and
otherwise go through Hugging Face `datasets`. Metrics follow the paper's answer checking.
"""

from .answers import answers_match, extract_number, numbers_equal
from .bbh import BBH_TASKS, bbh_kind, bbh_metric, load_bbh
from .gsm8k import gsm8k_metric, load_gsm8k
from .splits import split_examples
from .suite import SUITE, SuiteTask, get_task

__all__ = [
    "BBH_TASKS",
    "SUITE",
    "SuiteTask",
    "answers_match",
    "bbh_kind",
    "bbh_metric",
    "extract_number",
    "get_task",
    "gsm8k_metric",
    "load_bbh",
    "load_gsm8k",
    "numbers_equal",
    "split_examples",
]
