"""The functional mesa op: every method pinned to the naive reference, gradients, states, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mesa_module import ops
from mesa_module.ops import chunk as chunk_module
from mesa_module.ops import chunk_mesa_attention, mesa_attention, naive_mesa_attention

FAST_METHODS = ("chunk", "recurrent")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Gate regimes: gamma ranges (None: no log_gamma at all; (1, 1): log_gamma given and all zero).
GATES = {"none": None, "strong": (0.01, 0.1), "weak": (0.8, 0.99), "one": (1.0, 1.0)}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These shapes are tiny: threads only add OpenMP regions, each of which can wait a scheduler quantum for a
    descheduled thread on a busy machine (minutes instead of seconds for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    B=2,
    T=37,
    H=3,
    Dk=8,
    Dv=5,
    *,
    dtype=torch.float64,
    gate=None,
    beta=False,
    beta_zeros=True,
    initial_state=False,
    lam_per_head=False,
    seed=0,
):
    """Unit-norm queries and keys (as the layer feeds them), Gaussian values, lam in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = F.normalize(randn(B, T, H, Dk), dim=-1)
    k = F.normalize(randn(B, T, H, Dk), dim=-1)
    v = randn(B, T, H, Dv)
    lam = 0.5 + torch.rand(H, 1 if lam_per_head else Dk, generator=g, dtype=dtype)
    b = None
    if beta:
        b = torch.rand(B, T, H, generator=g, dtype=dtype)
        if beta_zeros:
            b[b < 0.3] = 0.0  # read without writing
    log_gamma = None
    if gate is not None:
        lo, hi = gate
        log_gamma = torch.log(lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=dtype))
    state = None
    if initial_state:
        keys = randn(B, H, 2 * Dk, Dk)
        state = (keys.mT @ keys / Dk, randn(B, H, Dv, Dk))
    return dict(q=q, k=k, v=v, lam=lam, beta=b, log_gamma=log_gamma, initial_state=state)


def run(inputs, method, **kwargs):
    x = dict(inputs)
    return mesa_attention(x.pop("q"), x.pop("k"), x.pop("v"), x.pop("lam"), method=method, **x, **kwargs)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# Forward: outputs and final states equal the reference


CASES = [
    # (B, T, H, Dk, Dv, chunk_size)
    (1, 1, 1, 4, 4, 64),  # a single token
    (2, 37, 3, 8, 5, 16),  # T not a multiple of the chunk, Dk != Dv
    (2, 100, 2, 6, 9, 32),  # Dv > Dk
    (1, 130, 2, 8, 8, 64),  # several chunks, last one ragged
    (3, 20, 2, 4, 3, 1),  # chunk of one token
    (1, 50, 1, 5, 5, 7),  # chunk size that divides nothing
    (2, 9, 2, 4, 4, 64),  # chunk larger than T
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("gate", list(GATES), ids=list(GATES))
@pytest.mark.parametrize("shape", CASES, ids=[f"B{c[0]}T{c[1]}H{c[2]}K{c[3]}V{c[4]}C{c[5]}" for c in CASES])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_matches_naive(method, shape, gate, dtype):
    B, T, H, Dk, Dv, C = shape
    inputs = make_inputs(B, T, H, Dk, Dv, dtype=dtype, gate=GATES[gate], beta=True, initial_state=True)
    ref, (h_ref, g_ref) = run(inputs, "naive", output_final_state=True)
    out, (h, g) = run(inputs, method, output_final_state=True, chunk_size=C)
    assert out.dtype == dtype and h.dtype == dtype and g.dtype == dtype
    assert out.shape == (B, T, H, Dv) and h.shape == (B, H, Dk, Dk) and g.shape == (B, H, Dv, Dk)
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(h, h_ref) <= TOL[dtype]
    assert rel_err(g, g_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("beta", [False, True], ids=["nobeta", "beta"])
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("lam_per_head", [False, True], ids=["lamK", "lam1"])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_matches_naive_options(method, lam_per_head, initial_state, beta, dtype):
    inputs = make_inputs(2, 45, 2, 6, 4, dtype=dtype, beta=beta, initial_state=initial_state, lam_per_head=lam_per_head)
    ref = run(inputs, "naive")
    out = run(inputs, method, chunk_size=16)
    assert rel_err(out, ref) <= TOL[dtype]


# Work-group sizes: everything at once; 2 or 3 of the 4 chunks per group (a partial slice); one chunk each.
@pytest.mark.parametrize("group_elements", [1 << 22, 20_000, 1], ids=["one_group", "groups", "chunk_by_chunk"])
@pytest.mark.parametrize("subchunk", [16, 5, 1], ids=["eig16", "eig5", "direct"])
@pytest.mark.parametrize("gate", ["strong", "weak"])
def test_gated_solvers_match_naive(monkeypatch, gate, subchunk, group_elements):
    """Both gated solvers (eigen-Woodbury per sub-chunk, direct per-token solves), forward and gradients,
    with the sequence solved in one group or a chunk at a time."""
    monkeypatch.setattr(chunk_module, "EIG_SUBCHUNK", subchunk)
    monkeypatch.setattr(chunk_module, "SOLVE_GROUP_ELEMENTS", group_elements)
    assert chunk_module._eig_subchunk(40) == {16: 10, 5: 5, 1: 0}[subchunk]
    inputs = make_inputs(2, 130, 2, 6, 5, gate=GATES[gate], beta=True, initial_state=True)
    ref, _ = run(inputs, "naive", output_final_state=True)
    out, _ = run(inputs, "chunk", output_final_state=True, chunk_size=40)
    assert rel_err(out, ref) <= 1e-10
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 130, 2, 5), (2, 2, 6, 6), (2, 2, 5, 6))]
    want, got = grads_of(inputs, "naive", weights), grads_of(inputs, "chunk", weights, chunk_size=40)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-10, name


def test_lapack_calls_split_across_threads():
    """With two intra-op threads the gated path's small LAPACK problems run on two Python threads, one intra-op
    thread each; results and gradients are those of one thread, and the thread count comes back."""
    inputs = make_inputs(1, 90, 3, 6, 5, gate=GATES["weak"], beta=True, initial_state=True)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((1, 90, 3, 5), (1, 3, 6, 6), (1, 3, 5, 6))]
    want = grads_of(inputs, "chunk", weights)
    torch.set_num_threads(2)
    try:
        got = grads_of(inputs, "chunk", weights)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-13, name


@pytest.mark.parametrize("method", FAST_METHODS)
def test_hard_reset_gate(method):
    """gamma = 0 (log gamma = -inf) forgets everything before, as at a document boundary."""
    inputs = make_inputs(1, 40, 2, 4, 4, gate=(0.5, 0.9))
    inputs["log_gamma"][:, 17] = -math.inf
    ref = run(inputs, "naive")
    out = run(inputs, method, chunk_size=8)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-10
    # After the reset the output is that of the sequence started at the reset.
    tail = {name: None if t is None else t[:, 17:] for name, t in inputs.items() if name not in ("lam",)}
    tail.update(lam=inputs["lam"], initial_state=None)
    assert rel_err(out[:, 17:], run(tail, "naive")) <= 1e-10


@pytest.mark.parametrize("method", ["naive", *FAST_METHODS])
def test_beta_zero_reads_without_writing(method):
    """A token with beta = 0 gets an output but leaves every later output unchanged."""
    inputs = make_inputs(1, 24, 2, 4, 3)
    inputs["beta"] = torch.ones(1, 24, 2, dtype=torch.float64)
    inputs["beta"][:, 10] = 0.0
    out = run(inputs, method, chunk_size=8)
    dropped = {name: inputs[name] for name in ("q", "k", "v", "beta")}
    keep = [t for t in range(24) if t != 10]
    dropped = {name: t[:, keep] for name, t in dropped.items()}
    dropped.update(lam=inputs["lam"], log_gamma=None, initial_state=None)
    expected = run(dropped, "naive")
    assert rel_err(out[:, keep], expected) <= 1e-10
    assert out[:, 10].abs().sum() > 0


def test_output_is_exact_least_squares_prediction():
    """One head, gamma = beta = 1: o_t is the ridge prediction from the pairs seen so far."""
    inputs = make_inputs(1, 30, 1, 4, 2)
    out = run(inputs, "chunk", chunk_size=8)[0, :, 0]
    k, v, q, lam = inputs["k"][0, :, 0], inputs["v"][0, :, 0], inputs["q"][0, :, 0], inputs["lam"][0]
    for t in (0, 7, 8, 29):
        phi = v[: t + 1].T @ k[: t + 1] @ torch.linalg.inv(k[: t + 1].T @ k[: t + 1] + torch.diag(lam))
        assert rel_err(out[t], phi @ q[t]) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Gradients


def leaves_of(inputs):
    """Fresh leaf copies of the inputs: ``(leaves by name, h0 and g0 for the initial state; the inputs to pass)``."""
    leaves, x = {}, {}
    for name, t in inputs.items():
        if name == "initial_state":
            x[name] = None if t is None else tuple(s.detach().clone().requires_grad_() for s in t)
            if t is not None:
                leaves["h0"], leaves["g0"] = x[name]
        elif t is None:
            x[name] = None
        else:
            x[name] = leaves[name] = t.detach().clone().requires_grad_()
    return leaves, x


def grads_of(inputs, method, weights, chunk_size=16):
    """Gradients of a random linear function of (o, H_T, G_T) for every differentiable input."""
    leaves, x = leaves_of(inputs)
    o, (h, g) = run(x, method, output_final_state=True, chunk_size=chunk_size)
    loss = (o * weights[0]).sum() + (h * weights[1]).sum() + (g * weights[2]).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


@pytest.mark.parametrize("gate", list(GATES), ids=list(GATES))
@pytest.mark.parametrize("shape", [(2, 37, 2, 6, 5, 16), (1, 64, 3, 4, 4, 32), (2, 5, 2, 3, 4, 64)])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_gradients_match_naive(method, shape, gate):
    B, T, H, Dk, Dv, C = shape
    inputs = make_inputs(B, T, H, Dk, Dv, gate=GATES[gate], beta=True, initial_state=True)
    g = torch.Generator().manual_seed(1)
    weights = [
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, H, Dv), (B, H, Dk, Dk), (B, H, Dv, Dk))
    ]
    ref = grads_of(inputs, "naive", weights)
    got = grads_of(inputs, method, weights, chunk_size=C)
    assert set(got) == {"q", "k", "v", "lam", "beta", "log_gamma", "h0", "g0"} - (
        {"log_gamma"} if GATES[gate] is None else set()
    )
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-10, name


@pytest.mark.parametrize("gate", ["none", "weak"])
@pytest.mark.parametrize("method", FAST_METHODS)
def test_gradients_with_one_lambda_per_head(method, gate):
    inputs = make_inputs(2, 30, 2, 5, 4, gate=GATES[gate], beta=True, lam_per_head=True)
    assert inputs["lam"].shape == (2, 1)
    weights = [torch.randn(2, 30, 2, 4, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)]
    weights.append(torch.randn(2, 2, 4, 5, dtype=torch.float64))
    want, got = grads_of(inputs, "naive", weights), grads_of(inputs, method, weights, chunk_size=8)
    assert got["lam"].shape == (2, 1)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-10, name


def test_gradients_match_naive_float32():
    inputs = make_inputs(2, 70, 2, 8, 8, dtype=torch.float32, gate=(0.8, 0.99), beta=True, initial_state=True)
    inputs64 = {
        n: None if t is None else (tuple(s.double() for s in t) if isinstance(t, tuple) else t.double())
        for n, t in inputs.items()
    }
    weights = [torch.randn(2, 70, 2, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)]
    ref = grads_of(inputs64, "naive", [w.double() for w in weights])
    for method in FAST_METHODS:
        got = grads_of(inputs, method, weights)
        for name in ref:
            assert got[name].dtype == torch.float32
            assert rel_err(got[name].double(), ref[name]) <= 1e-4, (method, name)


def _gradcheck_inputs(gated, T=5):
    g = torch.Generator().manual_seed(3)
    B, H, Dk, Dv = 1, 2, 3, 2
    q, k = (
        torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64),
        torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64),
    )
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    lam = 0.5 + torch.rand(H, Dk, generator=g, dtype=torch.float64)
    beta = 0.2 + 0.7 * torch.rand(B, T, H, generator=g, dtype=torch.float64)  # away from 0 and 1
    log_gamma = (
        -0.1 - torch.rand(B, T, H, generator=g, dtype=torch.float64)
        if gated
        else torch.zeros(B, T, H, dtype=torch.float64)
    )
    keys = torch.randn(B, H, Dk, Dk, generator=g, dtype=torch.float64)
    h0, g0 = keys.mT @ keys, torch.randn(B, H, Dv, Dk, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, lam, beta, log_gamma, h0, g0)]


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("method", ["naive", "chunk", "recurrent"])
def test_gradcheck(method, gated):
    """Every input's gradient, through the output and both final states, against finite differences."""
    inputs = _gradcheck_inputs(gated)

    implementation = {
        "naive": ops.naive_mesa_attention,
        "chunk": lambda *args, **kwargs: chunk_mesa_attention(*args, chunk_size=2, **kwargs),
        "recurrent": ops.recurrent_mesa_attention,
    }[method]

    def fn(q, k, v, lam, beta, log_gamma, h0, g0):
        # Called below the public entry: at log gamma = 0 exactly (the ungated case) the finite differences
        # step to log gamma = +eps, which validation would refuse. The chunk path then takes the Woodbury
        # solver at the point itself and the gated solver at the perturbed points: one function, two solvers.
        o, (h, g) = implementation(
            q, k, v, lam, beta=beta, log_gamma=log_gamma, initial_state=(h0, g0), output_final_state=True
        )
        return o, h, g

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 8], ids=["eig4", "eig8"])
def test_gradcheck_gated_eigen_woodbury(chunk_size):
    """The gated eigen-Woodbury solver (sub-chunks of 4 or 8 tokens, two capacitance blocks each, kept
    decompositions), every input's gradient against finite differences; longer than one chunk."""
    inputs = _gradcheck_inputs(True, T=11)
    assert chunk_module._eig_subchunk(chunk_size) == chunk_size

    def fn(q, k, v, lam, beta, log_gamma, h0, g0):
        o, (h, g) = chunk_mesa_attention(
            q, k, v, lam, beta, log_gamma, (h0, g0), output_final_state=True, chunk_size=chunk_size
        )
        return o, h, g

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_chunk_without_gates():
    """The Woodbury path with beta and log_gamma absent (the 2023 layer)."""
    q, k, v, lam, _, _, h0, g0 = _gradcheck_inputs(False)

    def fn(q, k, v, lam, h0, g0):
        o, (h, g) = mesa_attention(
            q, k, v, lam, initial_state=(h0, g0), output_final_state=True, method="chunk", chunk_size=3
        )
        return o, h, g

    assert torch.autograd.gradcheck(fn, (q, k, v, lam, h0, g0), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# States


@pytest.mark.parametrize("gate", ["none", "weak"])
@pytest.mark.parametrize("first,second", [("chunk", "chunk"), ("chunk", "recurrent"), ("recurrent", "chunk")])
def test_state_carried_across_calls(first, second, gate):
    inputs = make_inputs(2, 50, 2, 6, 4, gate=GATES[gate], beta=True, initial_state=True)
    whole, (h_ref, g_ref) = run(inputs, "naive", output_final_state=True)
    split = 29
    head = {
        n: (t[:, :split] if n in ("q", "k", "v", "beta", "log_gamma") and t is not None else t)
        for n, t in inputs.items()
    }
    tail = {
        n: (t[:, split:] if n in ("q", "k", "v", "beta", "log_gamma") and t is not None else t)
        for n, t in inputs.items()
    }
    o1, state = run(head, first, output_final_state=True, chunk_size=8)
    tail["initial_state"] = state
    o2, (h, g) = run(tail, second, output_final_state=True, chunk_size=8)
    assert rel_err(torch.cat([o1, o2], dim=1), whole) <= 1e-10
    assert rel_err(h, h_ref) <= 1e-10 and rel_err(g, g_ref) <= 1e-10


def test_token_by_token_decoding_equals_forward():
    inputs = make_inputs(1, 12, 2, 4, 4, gate=(0.8, 0.99), beta=True)
    whole = run(inputs, "chunk", chunk_size=4)
    state, outs = None, []
    for t in range(12):
        step = {n: (x[:, t : t + 1] if n in ("q", "k", "v", "beta", "log_gamma") else x) for n, x in inputs.items()}
        step["initial_state"] = state
        o, state = run(step, "auto", output_final_state=True)
        outs.append(o)
    assert rel_err(torch.cat(outs, dim=1), whole) <= 1e-10


def test_gradient_flows_through_carried_state():
    """The final state of one call feeds the next: gradients reach the first call's inputs."""
    inputs = make_inputs(1, 20, 2, 4, 3)
    k = inputs["k"].clone().requires_grad_()
    _, state = mesa_attention(
        inputs["q"][:, :10],
        k[:, :10],
        inputs["v"][:, :10],
        inputs["lam"],
        output_final_state=True,
        method="chunk",
        chunk_size=4,
    )
    o2 = mesa_attention(
        inputs["q"][:, 10:],
        k[:, 10:],
        inputs["v"][:, 10:],
        inputs["lam"],
        initial_state=state,
        method="chunk",
        chunk_size=4,
    )
    (grad_split,) = torch.autograd.grad(o2.sum(), k)
    k2 = inputs["k"].clone().requires_grad_()
    whole = naive_mesa_attention(inputs["q"], k2, inputs["v"], inputs["lam"])
    (grad_whole,) = torch.autograd.grad(whole[:, 10:].sum(), k2)
    assert grad_split[:, :10].abs().sum() > 0
    assert rel_err(grad_split, grad_whole) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Precision and robustness


@pytest.mark.parametrize("method", ["naive", *FAST_METHODS])
def test_bf16_autocast_keeps_states_fp32(method):
    inputs = make_inputs(2, 40, 2, 8, 8, dtype=torch.float32, gate=(0.8, 0.99), beta=True, initial_state=True)
    ref, _ = run(inputs, "naive", output_final_state=True)
    half = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, g) = run(half, method, output_final_state=True, chunk_size=16)
        out32 = run(inputs, method, chunk_size=16)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32 and g.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) <= 2e-2  # only the bf16 rounding of q, k, v and o
    # fp32 inputs under autocast are computed in fp32 all the way: autocast does not leak in.
    assert out32.dtype == torch.float32 and rel_err(out32, ref) <= 1e-5


@pytest.mark.parametrize("gate", ["none", "weak"])
@pytest.mark.parametrize("method", ["chunk"])
def test_backward_under_autocast_matches_fp32(method, gate):
    """A training step may call backward() inside autocast: the chunk path's gradients stay fp32.

    (naive and recurrent differentiate by autograd, whose formulas follow the autocast state of the thread
    that runs backward - on CPU, the caller's.)
    """
    inputs = make_inputs(2, 40, 2, 8, 8, dtype=torch.float32, gate=GATES[gate], beta=True, initial_state=True)
    weights = [torch.randn(2, 40, 2, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)]
    want = grads_of(inputs, method, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads_of(inputs, method, weights)
    for name in want:
        assert got[name].dtype == torch.float32
        assert rel_err(got[name], want[name]) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_half_outputs(dtype):
    inputs = make_inputs(1, 30, 2, 8, 8, dtype=torch.float32)
    ref = run(inputs, "naive")
    half = {n: (t.to(dtype) if n in ("q", "k", "v", "lam") else t) for n, t in inputs.items()}
    out = run(half, "chunk", chunk_size=8)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) <= 2e-2


@pytest.mark.parametrize("method", ["naive", *FAST_METHODS])
def test_zero_keys_and_huge_values_stay_finite(method):
    inputs = make_inputs(1, 70, 2, 8, 4, dtype=torch.float32, beta=True, gate=(0.8, 0.99))
    zero = dict(inputs, k=torch.zeros_like(inputs["k"]))
    out = run(zero, method, chunk_size=16)
    assert torch.isfinite(out).all() and out.abs().max() == 0  # nothing written, nothing read
    huge = dict(inputs, v=inputs["v"] * 1e30)
    out = run(huge, method, chunk_size=16)
    ref = run(dict(inputs), method, chunk_size=16)
    assert torch.isfinite(out).all()
    assert rel_err(out / 1e30, ref) <= 1e-5
    big_keys = dict(inputs, k=inputs["k"] * 100.0)  # condition numbers near 1e4 * T
    out = run(big_keys, method, chunk_size=16)
    assert torch.isfinite(out).all()


def test_chunk_saves_no_per_token_matrices():
    """What the chunk path keeps for backward grows like T * Dk (plus T * Dk^2 / C), not T * Dk^2."""

    def saved_bytes(T, gated):
        inputs = make_inputs(1, T, 2, 16, 16, dtype=torch.float32, gate=(0.8, 0.99) if gated else None)
        q = inputs["q"].requires_grad_()
        o = run(dict(inputs, q=q), "chunk", chunk_size=32)
        node = o.grad_fn

        def tensors(x):  # everything kept on the node, through nested tuples
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, (tuple, list)):
                for item in x:
                    yield from tensors(item)

        return sum(t.numel() * t.element_size() for t in tensors((node.saved_tensors, node.solver)))

    for gated in (False, True):
        small, large = saved_bytes(256, gated), saved_bytes(1024, gated)
        q_bytes = 1024 * 2 * 16 * 4
        assert large <= 4.5 * small  # linear in T
        assert large <= 12 * q_bytes  # a few (T, H, D) tensors; T * Dk^2 would be 16x q alone


# ---------------------------------------------------------------------------------------------
# Dispatch and input validation


def test_auto_picks_recurrent_for_short_and_chunk_for_long(monkeypatch):
    calls = []
    monkeypatch.setattr(
        ops, "chunk_mesa_attention", lambda *a, **kw: calls.append("chunk") or chunk_mesa_attention(*a, **kw)
    )
    recurrent = ops._IMPLEMENTATIONS["recurrent"]
    monkeypatch.setitem(
        ops._IMPLEMENTATIONS, "recurrent", lambda *a, **kw: calls.append("recurrent") or recurrent(*a, **kw)
    )
    run(make_inputs(1, 1, 1, 4, 4), "auto")
    run(make_inputs(1, ops.RECURRENT_MAX_T + 1, 1, 4, 4), "auto")
    assert calls == ["recurrent", "chunk"]


def test_empty_sequence():
    inputs = make_inputs(2, 0, 2, 4, 3, initial_state=True)
    for method in ("naive", *FAST_METHODS):
        out, (h, g) = run(inputs, method, output_final_state=True)
        assert out.shape == (2, 0, 2, 3)
        assert torch.equal(g, inputs["initial_state"][1])


BAD = [
    (dict(method="fast"), ValueError, "method must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    (dict(q=torch.zeros(2, 5, 8)), ValueError, r"q must have 4 dimensions \(B, T, H, D\)"),
    (dict(k=torch.zeros(1, 5, 2, 3)), ValueError, "k must have the shape of q"),
    (dict(v=torch.zeros(1, 6, 2, 3)), ValueError, r"v must share \(B, T, H\) with q"),
    (dict(lam=torch.ones(4)), ValueError, r"lam must have shape \(H, Dk\)"),
    (dict(lam=torch.ones(3, 4)), ValueError, r"lam must have shape \(H, Dk\)"),
    (dict(lam=-torch.ones(2, 4)), ValueError, "lam must be positive"),
    (dict(lam=torch.zeros(2, 1)), ValueError, "lam must be positive"),
    (dict(beta=torch.ones(1, 5, 3)), ValueError, r"beta must have shape \(B, T, H\)"),
    (dict(beta=-torch.ones(1, 5, 2)), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(log_gamma=torch.ones(1, 5, 2)), ValueError, "log_gamma must be <= 0"),
    (dict(log_gamma=torch.zeros(5, 2)), ValueError, r"log_gamma must have shape \(B, T, H\)"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4)), ValueError, "initial_state must be a pair"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 3, 4))), ValueError, r"H_0\) must have shape"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 3))), ValueError, r"G_0\) must have shape"),
    (dict(q=torch.zeros(1, 5, 2, 4, dtype=torch.long)), TypeError, "floating-point"),
    (dict(v=[1.0]), TypeError, "v must be a torch.Tensor"),
]


@pytest.mark.parametrize("override,error,match", BAD, ids=[m.split()[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_inputs_raise_clear_errors(override, error, match):
    args = dict(q=torch.randn(1, 5, 2, 4), k=torch.randn(1, 5, 2, 4), v=torch.randn(1, 5, 2, 3), lam=torch.ones(2, 4))
    args.update(override)
    with pytest.raises(error, match=match):
        mesa_attention(**args)


# ---------------------------------------------------------------------------------------------
# Long sequences


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["none", "weak"])
def test_long_sequence_float32_matches_float64_reference(gate):
    inputs = make_inputs(1, 2048, 2, 32, 32, dtype=torch.float32, gate=GATES[gate], beta=True)
    ref = run({n: None if t is None else t.double() for n, t in inputs.items()}, "naive")
    out = run(inputs, "chunk")
    assert rel_err(out.double(), ref) <= 1e-5


@pytest.mark.slow
def test_compiled_op_matches_eager():
    inputs = make_inputs(1, 100, 2, 8, 8, dtype=torch.float32, beta=True)
    compiled = torch.compile(lambda q, k, v, lam, beta: mesa_attention(q, k, v, lam, beta=beta, method="chunk"))
    out = compiled(inputs["q"], inputs["k"], inputs["v"], inputs["lam"], inputs["beta"])
    assert rel_err(out, run(inputs, "chunk")) <= 1e-6
