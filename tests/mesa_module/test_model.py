"""Tests of MesaLM: config checks, causality, decoding against the full forward pass, padding, gradients,
activation checkpointing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mesa_module import MesaLM, MesaLMConfig
from mesa_module.layer import MesaState
from mesa_module.model import KVCache

VOCAB = 40
STACKS = {
    "mesa": "mesa",
    "softmax": "softmax",
    "hybrid": ("mesa", "softmax", "mesa"),
}


def make_model(stack="hybrid", seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    config = MesaLMConfig(vocab_size=VOCAB, d_model=16, n_layers=3, n_heads=2, attention=STACKS[stack], **overrides)
    return MesaLM(config).to(dtype)


def tokens(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_config_expands_and_checks_the_attention_kinds():
    assert MesaLMConfig(n_layers=2, attention="softmax").attention == ("softmax", "softmax")
    assert MesaLMConfig(n_layers=2, attention=["mesa", "softmax"]).attention == ("mesa", "softmax")
    assert MesaLMConfig(d_model=12, n_heads=3).head_dim == 4
    with pytest.raises(ValueError, match="attention"):
        MesaLMConfig(n_layers=2, attention=("mesa",))
    with pytest.raises(ValueError, match="attention"):
        MesaLMConfig(n_layers=1, attention="linear")
    with pytest.raises(ValueError, match="divisible"):
        MesaLMConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="even head_dim"):
        MesaLMConfig(d_model=12, n_heads=4, attention="softmax")


def test_blocks_follow_the_config():
    model = make_model("hybrid")
    assert [block.kind for block in model.blocks] == ["mesa", "softmax", "mesa"]
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stack", STACKS)
def test_forward_is_causal_and_gives_a_loss(stack):
    model = make_model(stack)
    idx = tokens(2, 9)
    logits, loss = model(idx, targets=tokens(2, 9, seed=2))
    assert logits.shape == (2, 9, VOCAB)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(VOCAB)).item()) < 0.5
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    logits_changed, no_loss = model(changed)
    assert no_loss is None
    assert_close(logits_changed[:, :6], logits[:, :6])
    assert (logits_changed[:, 6:] - logits[:, 6:]).abs().amax() > 1e-6


@pytest.mark.parametrize("stack", STACKS)
def test_prefill_then_token_by_token_decoding_equals_forward(stack):
    model = make_model(stack)
    idx = tokens(2, 8)
    logits, _ = model(idx)
    prefill, _, state = model(idx[:, :3], return_state=True)
    steps = [prefill]
    for t in range(3, 8):
        step, _, state = model(idx[:, t : t + 1], state=state, return_state=True)
        steps.append(step)
    assert_close(torch.cat(steps, dim=1), logits)
    kinds = {"mesa": MesaState, "softmax": KVCache}
    assert [type(s) for s in state] == [kinds[block.kind] for block in model.blocks]


@pytest.mark.parametrize("stack", STACKS)
def test_state_carried_across_two_chunks_equals_one_call(stack):
    model = make_model(stack)
    idx = tokens(2, 9)
    logits, _ = model(idx)
    first, _, state = model(idx[:, :4], return_state=True)
    second, _ = model(idx[:, 4:], state=state)
    assert_close(torch.cat([first, second], dim=1), logits)


@pytest.mark.parametrize("stack", STACKS)
def test_greedy_generate_matches_recomputing_the_full_sequence(stack):
    model = make_model(stack)
    prompt = tokens(2, 5)
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


@pytest.mark.parametrize("stack", STACKS)
def test_padded_batch_equals_unpadded_sequences(stack):
    model = make_model(stack)
    a, b = tokens(1, 6, seed=3), tokens(1, 4, seed=4)
    idx = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    idx[0, 1:], mask[0, 1:] = a, 1  # left padding
    idx[1, :4], mask[1, :4] = b, 1  # right padding
    logits, _ = model(idx, attention_mask=mask)
    assert_close(logits[0, 1:], model(a)[0][0])
    assert_close(logits[1, :4], model(b)[0][0])
    # Generation from padded prompts continues each prompt as if it were alone.
    out = model.generate(idx, 4, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 7:], model.generate(a, 4, temperature=0)[0, 6:])
    assert torch.equal(out[1, 7:], model.generate(b, 4, temperature=0)[0, 4:])


def test_sampling_respects_top_k_and_generator():
    model = make_model("hybrid", dtype=torch.float32)
    prompt = tokens(3, 4)
    first = model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, model.generate(prompt, 5, temperature=0))
    sample = model.generate(prompt, 5, temperature=1.5, generator=torch.Generator().manual_seed(0))
    again = model.generate(prompt, 5, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)


def test_gradients_reach_every_parameter():
    model = make_model("hybrid", bias=True)
    idx = tokens(2, 7)
    _, loss = model(idx, targets=tokens(2, 7, seed=5))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_is_finite():
    model = make_model("hybrid", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens(2, 8), targets=tokens(2, 8, seed=6))
        loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_rejects_bad_inputs():
    model = make_model("hybrid", dtype=torch.float32)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="token ids"):
        model(tokens(8))
    _, _, state = model(tokens(2, 4), return_state=True)
    with pytest.raises(ValueError, match="one entry per layer"):
        model(tokens(2, 1), state=state[:2])


@pytest.mark.parametrize("stack", STACKS)
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(stack):
    idx, targets = tokens(2, 9), tokens(2, 9, seed=5)
    grads, block_calls = {}, {}
    for checkpointing in (False, True):
        model = make_model(stack, bias=True, gradient_checkpointing=checkpointing)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        _, loss = model(idx, targets)
        loss.backward()
        grads[checkpointing] = {name: p.grad for name, p in model.named_parameters()}
        block_calls[checkpointing] = len(calls)
    assert block_calls == {False: 1, True: 2}  # the checkpointed block runs again in the backward pass
    for name, grad in grads[False].items():
        assert_close(grads[True][name], grad)


def test_mesa_module_works_without_transformers():
    """transformers is an optional extra: only mesa_module.hf imports it, and says how to install it."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, mesa_module\n"
        "model = mesa_module.MesaLM(mesa_module.MesaLMConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2))\n"
        "assert model(torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, 10)\n"
        "try:\n"
        "    import mesa_module.hf\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install -e '.[hf]'" in result.stdout
