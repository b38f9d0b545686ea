"""Packed sequences: offsets, the short convolution, MesaLayer and MesaLM against running each document alone."""

from __future__ import annotations

import pytest
import torch

from mesa_module import MesaLayer, MesaLM, MesaLMConfig, MesaState
from mesa_module.layer import ShortConvolution
from mesa_module.packing import check_cu_seqlens, cu_seqlens_from_position_ids, document_positions

D_MODEL, HEADS, VOCAB = 12, 3, 40
LENGTHS = [5, 1, 9, 3]  # a one-token document, and one longer than the chunk size used below
LAYER_CONFIGS = {
    "default": {},
    "mesanet": {"gated": True, "short_conv": True, "output_gate": True, "bias": True},
    "gates_only": {"gated": True},
    "conv_only": {"short_conv": True, "conv_size": 3},
}


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def pieces(t, lengths, dim=1):
    return torch.split(t, lengths, dim=dim)


# ---------------------------------------------------------------------------------------------------------------
# Offsets


def test_document_positions_and_offsets_from_position_ids():
    cu = torch.tensor([0, 3, 3, 5, 9])  # an empty document owns no token
    document, position = document_positions(cu, 9)
    assert document.tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    assert position.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    from_positions = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert from_positions.tolist() == [0, 3, 5, 9] and from_positions.dtype == torch.int32
    assert cu_seqlens_from_position_ids(torch.arange(4)).tolist() == [0, 4]
    assert check_cu_seqlens(cu, 1, 9) == 4


@pytest.mark.parametrize(
    "cu, error, match",
    [
        (torch.tensor([1, 4, 9]), ValueError, "start at 0"),
        (torch.tensor([0, 4, 8]), ValueError, "end at T = 9"),
        (torch.tensor([0, 6, 4, 9]), ValueError, "not decrease"),
        (torch.tensor([0.0, 9.0]), TypeError, "integers"),
        ([0, 9], TypeError, "integer torch.Tensor"),
        (torch.tensor([[0, 9]]), ValueError, "1-D"),
        (torch.tensor([0]), ValueError, "1-D"),
    ],
)
def test_bad_offsets_are_rejected_with_the_reason(cu, error, match):
    with pytest.raises(error, match=match):
        check_cu_seqlens(cu, 1, 9)


def test_packing_needs_one_row_and_counting_positions():
    with pytest.raises(ValueError, match="one row"):
        check_cu_seqlens(torch.tensor([0, 9]), 2, 9)
    with pytest.raises(ValueError, match="count up by one"):
        cu_seqlens_from_position_ids(torch.tensor([[0, 1, 3, 0]]))
    with pytest.raises(ValueError, match="count up by one"):
        cu_seqlens_from_position_ids(torch.tensor([[1, 2, 0]]))
    with pytest.raises(ValueError, match="one row"):
        cu_seqlens_from_position_ids(torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Short convolution


@pytest.mark.parametrize("with_state", [False, True])
def test_short_convolution_keeps_documents_apart(with_state):
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4, bias=True).double()
    lengths = [3, 1, 0, 6, 2]  # shorter than the kernel, empty, longer
    x = randn(1, sum(lengths), 6).requires_grad_()
    state = randn(len(lengths), 3, 6, seed=2) if with_state else None
    y, new_state = conv(x, state, cu_seqlens=offsets(lengths))
    weights = randn(*y.shape, seed=3)
    grad_packed = torch.autograd.grad((y * weights).sum(), [x, conv.weight, conv.bias])

    ys, states = [], []
    for i, (piece, n) in enumerate(zip(pieces(x, lengths), lengths, strict=True)):
        start = torch.zeros(1, 3, 6, dtype=x.dtype) if state is None else state[i : i + 1]
        if n == 0:  # an empty document leaves its state as it was
            states.append(start)
            continue
        y_i, state_i = conv(piece, start)
        ys.append(y_i)
        states.append(state_i)
    y_alone = torch.cat(ys, dim=1)
    assert_close(y, y_alone)
    assert_close(new_state, torch.cat(states))
    grad_alone = torch.autograd.grad((y_alone * weights).sum(), [x, conv.weight, conv.bias])
    for packed, alone in zip(grad_packed, grad_alone, strict=True):
        assert_close(packed, alone)


# ---------------------------------------------------------------------------------------------------------------
# MesaLayer


def make_layer(config, seed=0, **overrides):
    torch.manual_seed(seed)
    return MesaLayer(D_MODEL, HEADS, chunk_size=4, **{**LAYER_CONFIGS[config], **overrides}).double()


def stack_states(states):
    return MesaState(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*states, strict=True)))


@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_packed_layer_equals_each_document_alone(config):
    layer = make_layer(config)
    x = randn(1, sum(LENGTHS), D_MODEL).requires_grad_()
    y, state = layer(x, cu_seqlens=offsets(LENGTHS), return_state=True)
    weights = randn(*y.shape, seed=5)
    params = [x, *layer.parameters()]
    grad_packed = torch.autograd.grad((y * weights).sum() + state.h.sum() + state.g.sum(), params)

    alone = [layer(piece, return_state=True) for piece in pieces(x, LENGTHS)]
    y_alone = torch.cat([y_i for y_i, _ in alone], dim=1)
    state_alone = stack_states([s for _, s in alone])
    assert_close(y, y_alone)
    assert state.h.shape[0] == len(LENGTHS)
    assert_close(state.h, state_alone.h)
    assert_close(state.g, state_alone.g)
    if layer.short_conv:
        assert_close(state.conv, state_alone.conv)
    loss_alone = (y_alone * weights).sum() + state_alone.h.sum() + state_alone.g.sum()
    names = ["x", *dict(layer.named_parameters())]
    for name, packed, alone in zip(names, grad_packed, torch.autograd.grad(loss_alone, params), strict=True):
        torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("method", ["chunk", "recurrent", "naive"])
def test_packed_layer_continues_each_document_from_its_state(method):
    layer = make_layer("mesanet", method=method)
    first = [randn(1, n, D_MODEL, seed=10 + i) for i, n in enumerate(LENGTHS)]
    second_lengths = [2, 7, 1, 4]
    second = randn(1, sum(second_lengths), D_MODEL, seed=20)
    write = torch.ones(1, sum(second_lengths))
    write[0, [1, 5]] = 0  # read-only tokens work inside packed documents too
    states = [layer(piece, return_state=True)[1] for piece in first]
    y, state = layer(
        second, cu_seqlens=offsets(second_lengths), state=stack_states(states), write_mask=write, return_state=True
    )
    expected, expected_states = [], []
    for piece, piece_write, start in zip(
        pieces(second, second_lengths), pieces(write, second_lengths), states, strict=True
    ):
        y_i, s_i = layer(piece, state=start, write_mask=piece_write, return_state=True)
        expected.append(y_i)
        expected_states.append(s_i)
    assert_close(y, torch.cat(expected, dim=1))
    for got, want in zip(state, stack_states(expected_states), strict=True):
        assert_close(got, want)


def test_packed_layer_rejects_what_does_not_fit():
    layer = make_layer("mesanet")
    x = randn(1, 9, D_MODEL)
    with pytest.raises(ValueError, match="one row"):
        layer(randn(2, 9, D_MODEL), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="end at T = 9"):
        layer(x, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="not both"):
        layer(x, cu_seqlens=torch.tensor([0, 4, 9]), attention_mask=torch.ones(1, 9))
    _, state = layer(randn(3, 2, D_MODEL), return_state=True)
    with pytest.raises(ValueError, match="number of packed documents"):
        layer(x, cu_seqlens=torch.tensor([0, 4, 9]), state=state)


# ---------------------------------------------------------------------------------------------------------------
# MesaLM


STACKS = {"mesa": "mesa", "softmax": "softmax", "hybrid": ("mesa", "softmax", "mesa")}


def make_model(stack, **overrides):
    torch.manual_seed(0)
    config = MesaLMConfig(
        vocab_size=VOCAB, d_model=16, n_layers=3, n_heads=2, attention=STACKS[stack], mesa_chunk_size=4, **overrides
    )
    return MesaLM(config).double()


def documents(lengths, seed=40):
    return [
        torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed + i))
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("lengths", [LENGTHS, [14, 1, 2, 1]], ids=["even", "uneven"])  # softmax: batch or mask
def test_packed_model_equals_each_document_alone(stack, lengths):
    model = make_model(stack)
    docs = documents(lengths)
    packed = torch.cat(docs, dim=1)
    # Each document's last target is -100: its next token would belong to the next document.
    targets = torch.cat([torch.cat([d[:, 1:], torch.full((1, 1), -100)], dim=1) for d in docs], dim=1)
    logits, loss = model(packed, targets, cu_seqlens=offsets(lengths))
    alone = [model(d, t) for d, t in zip(docs, pieces(targets, lengths), strict=True)]
    assert_close(logits, torch.cat([lg for lg, _ in alone], dim=1))
    # The packed loss is the mean over all predicted tokens: weight each document by its number of targets.
    counts = [n - 1 for n in lengths]
    loss_alone = sum(doc_loss * c for (_, doc_loss), c in zip(alone, counts, strict=True) if c) / sum(counts)
    assert_close(loss, loss_alone, tol=1e-6)  # the model's loss is computed in float32
    # Gradients of a float64 loss on the logits, to compare them at float64 precision.
    params = list(model.parameters())
    weights = randn(*logits.shape, seed=6)
    grads = torch.autograd.grad((logits * weights).sum(), params)
    grads_alone = torch.autograd.grad(
        sum((lg * w).sum() for (lg, _), w in zip(alone, pieces(weights, lengths), strict=True)), params
    )
    for packed_grad, alone_grad in zip(grads, grads_alone, strict=True):
        assert_close(packed_grad, alone_grad)


@pytest.mark.parametrize("stack", STACKS)
def test_packed_prefill_continues_as_a_batch_of_documents(stack):
    model = make_model(stack)
    lengths = [5, 0, 9, 3]  # an empty document continues from a fresh state
    docs = documents(lengths)
    _, _, state = model(torch.cat(docs, dim=1), cu_seqlens=offsets(lengths), return_state=True)
    following = torch.randint(0, VOCAB, (len(docs), 3), generator=torch.Generator().manual_seed(50))
    logits, _ = model(following, state=state)
    for i, doc in enumerate(docs):
        alone, _ = model(torch.cat([doc, following[i : i + 1]], dim=1))
        assert_close(logits[i], alone[0, -3:])


def test_packed_model_rejects_padding_and_softmax_state():
    model = make_model("hybrid")
    idx = torch.randint(0, VOCAB, (1, 9))
    with pytest.raises(ValueError, match="not both"):
        model(idx, cu_seqlens=torch.tensor([0, 4, 9]), attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="one row"):
        model(idx.expand(2, 9), cu_seqlens=torch.tensor([0, 4, 9]))
    _, _, state = model(idx[:, :4], return_state=True)
    with pytest.raises(ValueError, match="softmax layer cannot continue packed documents"):
        model(idx[:, 4:], cu_seqlens=torch.tensor([0, 5]), state=state)
