"""Adding the ``local`` provider to litellm: lazily, whoever imports litellm."""

from local_helpers import run_python


def test_register_is_lazy_and_hooks_a_later_litellm_import():
    out = run_python(
        "import sys\n"
        "import dspy_opro\n"
        "litellm_before = 'litellm' in sys.modules\n"
        "import dspy_opro.local as local\n"
        "local.register(); local.register()\n"
        "assert sys.modules.get('llama_cpp') is None\n"
        "assert litellm_before or 'litellm' not in sys.modules, 'register() imported litellm'\n"
        "import litellm\n"
        "entries = [e for e in litellm.custom_provider_map if e['provider'] == 'local']\n"
        "assert len(entries) == 1, entries\n"
        "assert litellm.__spec__.loader.__class__.__name__ != '_RegisterAfterExec'\n"
        "local.register()\n"
        "assert len([e for e in litellm.custom_provider_map if e['provider'] == 'local']) == 1\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def test_register_reaches_litellm_loaded_by_dspy():
    # DSPy asks importlib for litellm's spec first and imports it later, on first use.
    out = run_python(
        "import dspy, dspy_opro.local as local\n"
        "local.register()\n"
        "from dspy.clients._litellm import get_litellm\n"
        "litellm = get_litellm(feature='test')\n"
        "print(local.is_registered())\n"
    )
    assert out.strip() == "True"
