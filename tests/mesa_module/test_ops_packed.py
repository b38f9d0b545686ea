"""Packed sequences (``cu_seqlens``): every method equals running each document on its own, gradients included."""

from __future__ import annotations

import pytest
import torch
from test_ops import GATES, leaves_of, make_inputs, rel_err, run

from mesa_module.ops import chunk_mesa_attention, mesa_attention

METHODS = ("naive", "chunk", "recurrent", "auto")
PER_TOKEN = ("q", "k", "v", "beta", "log_gamma")
# Ragged documents: shorter than a chunk, one token, empty (at the start, in the middle, at the end), longer than
# several chunks, none aligned to chunk boundaries.
LENGTHS = {
    "ragged": [5, 0, 17, 1, 40, 9],
    "empty_ends": [0, 23, 3, 0],
    "one_doc": [37],
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def packed_inputs(lengths, *, gate, initial_state, H=2, Dk=6, Dv=5, dtype=torch.float64, seed=0):
    inputs = make_inputs(1, sum(lengths), H, Dk, Dv, dtype=dtype, gate=gate, beta=True, seed=seed)
    if initial_state:
        g = torch.Generator().manual_seed(seed + 1)
        keys = torch.randn(len(lengths), H, 2 * Dk, Dk, generator=g, dtype=dtype)
        inputs["initial_state"] = (keys.mT @ keys / Dk, torch.randn(len(lengths), H, Dv, Dk, generator=g, dtype=dtype))
    return inputs


def documents(inputs, lengths):
    """Each document's inputs as a call of its own (B = 1, its own initial state)."""
    state, start = inputs["initial_state"], 0
    for n, length in enumerate(lengths):
        doc = {name: None if inputs[name] is None else inputs[name][:, start : start + length] for name in PER_TOKEN}
        doc["lam"] = inputs["lam"]
        doc["initial_state"] = None if state is None else (state[0][n : n + 1], state[1][n : n + 1])
        start += length
        yield doc


def one_by_one(inputs, lengths):
    """The reference: naive on every document separately, outputs concatenated, final states stacked."""
    outs, hs, gs = [], [], []
    for doc in documents(inputs, lengths):
        o, (h, g) = run(doc, "naive", output_final_state=True)
        outs.append(o)
        hs.append(h)
        gs.append(g)
    return torch.cat(outs, dim=1), torch.cat(hs), torch.cat(gs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("gate", ["none", "strong", "weak", "one"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("method", METHODS)
def test_packed_equals_documents_run_alone(method, lengths, gate, initial_state, dtype):
    lengths = LENGTHS[lengths]
    inputs = packed_inputs(lengths, gate=GATES[gate], initial_state=initial_state, dtype=dtype)
    ref, h_ref, g_ref = one_by_one(inputs, lengths)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for chunk_size in (8, 16, 64):
        out, (h, g) = run(inputs, method, output_final_state=True, chunk_size=chunk_size, cu_seqlens=offsets(lengths))
        assert out.shape == ref.shape and h.shape == (len(lengths), 2, 6, 6) and g.shape == (len(lengths), 2, 5, 6)
        assert rel_err(out, ref) <= tol, chunk_size
        assert rel_err(h, h_ref) <= tol and rel_err(g, g_ref) <= tol, chunk_size


def test_empty_documents_hand_their_initial_state_on():
    lengths = [0, 4, 0]
    inputs = packed_inputs(lengths, gate=GATES["weak"], initial_state=True)
    for method in METHODS:
        _, (h, g) = run(inputs, method, output_final_state=True, cu_seqlens=offsets(lengths))
        for n in (0, 2):
            assert torch.equal(g[n], inputs["initial_state"][1][n])
            assert rel_err(h[n], inputs["initial_state"][0][n]) <= 1e-15  # its symmetric part, which it is


def test_many_chunks_restart_inside_woodbury_blocks():
    """Chunks of 4 tokens: the ungated path's blocks of sequential chunks contain document starts."""
    lengths = [3, 50, 7, 1, 66, 12, 29]
    inputs = packed_inputs(lengths, gate=None, initial_state=True)
    ref, h_ref, g_ref = one_by_one(inputs, lengths)
    out, (h, g) = run(inputs, "chunk", output_final_state=True, chunk_size=4, cu_seqlens=offsets(lengths))
    assert rel_err(out, ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10 and rel_err(g, g_ref) <= 1e-10


@pytest.mark.parametrize("gate", ["none", "weak"])
def test_many_short_documents(gate):
    """Hundreds of documents of 0 to 6 tokens, most shorter than a chunk."""
    lengths = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    inputs = packed_inputs(lengths, gate=GATES[gate], initial_state=True, H=1, Dk=4, Dv=3)
    ref, (h_ref, g_ref) = run(inputs, "naive", output_final_state=True, cu_seqlens=offsets(lengths))
    out, (h, g) = run(inputs, "chunk", output_final_state=True, chunk_size=4, cu_seqlens=offsets(lengths))
    assert rel_err(out, ref) <= 1e-10 and rel_err(h, h_ref) <= 1e-10 and rel_err(g, g_ref) <= 1e-10


def test_documents_do_not_see_each_other():
    """Changing one document's tokens changes no other document's output."""
    lengths = [10, 12, 9]
    inputs = packed_inputs(lengths, gate=GATES["weak"], initial_state=False)
    base = run(inputs, "chunk", chunk_size=8, cu_seqlens=offsets(lengths))
    changed = dict(inputs, v=inputs["v"].clone(), k=inputs["k"].clone())
    changed["v"][:, 10:22] += 1.0
    changed["k"][:, 10:22] = changed["k"][:, 10:22].flip(-1)
    out = run(changed, "chunk", chunk_size=8, cu_seqlens=offsets(lengths))
    assert torch.equal(out[:, :10], base[:, :10]) and torch.equal(out[:, 22:], base[:, 22:])
    assert not torch.allclose(out[:, 10:22], base[:, 10:22])


@pytest.mark.parametrize("gate", ["none", "strong", "weak"])
@pytest.mark.parametrize("method", ["chunk", "recurrent"])
def test_packed_gradients_equal_documents_run_alone(method, gate):
    lengths = LENGTHS["ragged"]
    inputs = packed_inputs(lengths, gate=GATES[gate], initial_state=True)
    g = torch.Generator().manual_seed(7)
    T, N = sum(lengths), len(lengths)
    weights = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, T, 2, 5), (N, 2, 6, 6), (N, 2, 5, 6))]

    leaves, x = leaves_of(inputs)
    o, (h, gg) = run(x, method, output_final_state=True, chunk_size=8, cu_seqlens=offsets(lengths))
    loss = (o * weights[0]).sum() + (h * weights[1]).sum() + (gg * weights[2]).sum()
    got = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    ref_leaves, ref_x = leaves_of(inputs)
    o, h, gg = one_by_one(ref_x, lengths)
    loss = (o * weights[0]).sum() + (h * weights[1]).sum() + (gg * weights[2]).sum()
    want = dict(zip(ref_leaves, torch.autograd.grad(loss, list(ref_leaves.values())), strict=True))
    assert set(got) == set(want)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-10, name


@pytest.mark.parametrize("chunk_size", [2, 4], ids=["direct", "eig4"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_gradcheck_packed_chunk(gated, chunk_size):
    """Every input's gradient (initial states per document included) against finite differences."""
    gen = torch.Generator().manual_seed(3)
    lengths, H, Dk, Dv = [3, 0, 1, 6], 2, 3, 2
    T, N = sum(lengths), len(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    keys = randn(N, H, Dk, Dk)
    inputs = [
        randn(1, T, H, Dk),
        randn(1, T, H, Dk),
        randn(1, T, H, Dv),
        0.5 + torch.rand(H, Dk, generator=gen, dtype=torch.float64),
        0.2 + 0.7 * torch.rand(1, T, H, generator=gen, dtype=torch.float64),
        -0.1 - torch.rand(1, T, H, generator=gen, dtype=torch.float64) if gated else torch.zeros(1, T, H).double(),
        keys.mT @ keys,
        randn(N, H, Dv, Dk),
    ]
    cu = offsets(lengths)

    def fn(q, k, v, lam, beta, log_gamma, h0, g0):
        o, (h, g) = chunk_mesa_attention(
            q, k, v, lam, beta, log_gamma, (h0, g0), output_final_state=True, chunk_size=chunk_size, cu_seqlens=cu
        )
        return o, h, g

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in inputs], eps=1e-6, atol=1e-7, rtol=1e-5)


BAD = [
    (dict(B=2), ValueError, r"B == 1"),
    (dict(cu=torch.tensor([0.0, 5.0])), TypeError, "must hold integers"),
    (dict(cu=[0, 5]), TypeError, "1-D integer torch.Tensor"),
    (dict(cu=torch.tensor([[0, 5]])), ValueError, "must be 1-D"),
    (dict(cu=torch.tensor([0])), ValueError, "must be 1-D with at least two offsets"),
    (dict(cu=torch.tensor([1, 5])), ValueError, "must start at 0 and end at T"),
    (dict(cu=torch.tensor([0, 4])), ValueError, "must start at 0 and end at T"),
    (dict(cu=torch.tensor([0, 3, 2, 5])), ValueError, "must not decrease"),
    (dict(state_lead=1), ValueError, r"H_0\) must have shape \(N, H, Dk, Dk\)"),
]


@pytest.mark.parametrize("case,error,match", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_cu_seqlens_raise_clear_errors(case, error, match):
    B = case.get("B", 1)
    q, k, v = torch.randn(B, 5, 2, 4), torch.randn(B, 5, 2, 4), torch.randn(B, 5, 2, 3)
    cu = case.get("cu", torch.tensor([0, 2, 5]))
    state = None
    if "state_lead" in case:
        n = case["state_lead"]
        state = (torch.zeros(n, 2, 4, 4), torch.zeros(n, 2, 3, 4))
    with pytest.raises(error, match=match):
        mesa_attention(q, k, v, torch.ones(2, 4), initial_state=state, cu_seqlens=cu)
