"""Task data and answer checking for the OPRO paper's benchmarks (GSM8K, BIG-Bench Hard).

Loaders read the original release files from a directory when given one (offline), and
otherwise go through Hugging Face `datasets`. Metrics follow the paper's answer checking.
"""

from .answers import answers_match, extract_number, numbers_equal
from .bbh import BBH_TASKS, bbh_kind, bbh_metric, load_bbh
from .gsm8k import gsm8k_metric, load_gsm8k
from .splits import split_examples

__all__ = [
    "BBH_TASKS",
    "answers_match",
    "bbh_kind",
    "bbh_metric",
    "extract_number",
    "gsm8k_metric",
    "load_bbh",
    "load_gsm8k",
    "numbers_equal",
    "split_examples",
]
