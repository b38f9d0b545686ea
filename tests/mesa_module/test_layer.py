"""Tests of MesaLayer: causality, streaming state, masks, dtypes, compilation, gradients, input checks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from mesa_module import MesaLayer, MesaState

D_MODEL, HEADS = 12, 3

# Ungated 2023 layer (the default), MesaNet's full layer, and the 2023 layer exactly (no stabilisers).
CONFIGS = {
    "default": {},
    "mesanet": {"gated": True, "short_conv": True, "output_gate": True, "bias": True},
    "paper2023": {"qk_norm": False, "output_norm": False},
}


def make_layer(config="default", seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return MesaLayer(D_MODEL, HEADS, **{**CONFIGS[config], **overrides}).to(dtype)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def assert_states_close(a: MesaState, b: MesaState, tol=1e-10):
    assert_close(a.h, b.h, tol)
    assert_close(a.g, b.g, tol)
    assert (a.conv is None) == (b.conv is None)
    if a.conv is not None:
        assert_close(a.conv, b.conv, tol)


@pytest.mark.parametrize("config", CONFIGS)
def test_output_shape_and_causality(config):
    layer = make_layer(config)
    x = randn(2, 9, D_MODEL)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    x_changed = x.clone()
    x_changed[:, 6:] = randn(2, 3, D_MODEL, seed=7)
    y_changed = layer(x_changed)
    assert_close(y_changed[:, :6], y[:, :6])
    assert (y_changed[:, 6:] - y[:, 6:]).abs().amax() > 1e-3


def test_paper_layer_matches_explicit_ridge_solve():
    """With no stabilisers, the layer is o_proj(G_t (H_t + Lambda)^{-1} q_t) per head, solved here directly."""
    layer = make_layer("paper2023", lambda_init=0.7)
    x = randn(2, 6, D_MODEL)
    B, T, H, D = 2, 6, HEADS, D_MODEL // HEADS
    q, k, v = (proj(x).view(B, T, H, D) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    expected = torch.empty(B, T, H, D, dtype=x.dtype)
    for t in range(T):
        kt, vt = k[:, : t + 1], v[:, : t + 1]
        h = torch.einsum("bshi,bshj->bhij", kt, kt) + torch.diag_embed(layer.lam)
        g = torch.einsum("bshi,bshj->bhij", vt, kt)
        expected[:, t] = (g @ torch.linalg.solve(h, q[:, t, ..., None]))[..., 0]
    assert_close(layer(x), layer.o_proj(expected.reshape(B, T, H * D)))
    assert_close(layer.lam, torch.full((H, D), 0.7, dtype=x.dtype), tol=1e-6)  # initialised in float32


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("split", [1, 2, 5])
def test_state_carried_across_two_calls_equals_one_call(config, split):
    layer = make_layer(config)
    x = randn(2, 8, D_MODEL)
    y, state = layer(x, return_state=True)
    y1, s1 = layer(x[:, :split], return_state=True)
    y2, s2 = layer(x[:, split:], state=s1, return_state=True)
    assert_close(torch.cat([y1, y2], dim=1), y)
    assert_states_close(s2, state)
    assert (state.conv is not None) == layer.short_conv


@pytest.mark.parametrize("config", CONFIGS)
def test_token_by_token_decoding_equals_forward(config):
    layer = make_layer(config)
    x = randn(2, 7, D_MODEL)
    y = layer(x)
    prefill, state = layer(x[:, :3], return_state=True)
    steps = [prefill]
    for t in range(3, 7):
        y_t, state = layer(x[:, t : t + 1], state=state, return_state=True)
        steps.append(y_t)
    assert_close(torch.cat(steps, dim=1), y)


@pytest.mark.parametrize("method", ["naive", "chunk", "recurrent"])
def test_every_op_method_gives_the_same_layer(method):
    reference = make_layer("mesanet", method="naive")
    layer = make_layer("mesanet", method=method, chunk_size=4)
    x = randn(2, 11, D_MODEL)
    write = torch.ones(2, 11)
    write[:, [3, 8]] = 0
    y_ref, state_ref = reference(x, write_mask=write, return_state=True)
    y1, state = layer(x[:, :6], write_mask=write[:, :6], return_state=True)
    y2, state = layer(x[:, 6:], write_mask=write[:, 6:], state=state, return_state=True)
    assert_close(torch.cat([y1, y2], dim=1), y_ref)
    assert_states_close(state, state_ref)


def test_state_detach_cuts_the_graph():
    layer = make_layer("mesanet")
    _, state = layer(randn(1, 4, D_MODEL), return_state=True)
    detached = state.detach()
    assert state.h.requires_grad and not any(t.requires_grad for t in detached)
    assert_states_close(detached, state)


def _pad(x, pads):
    """Places sequence b of x (B, T, C) inside a longer zero tensor with pads[b] = (left, right) padding."""
    B, T, C = x.shape
    total = T + max(left + right for left, right in pads)
    padded = torch.zeros(B, total, C, dtype=x.dtype)
    mask = torch.zeros(B, total, dtype=torch.long)
    for b, (left, _right) in enumerate(pads):
        padded[b, left : left + T] = x[b]
        mask[b, left : left + T] = 1
    return padded, mask


@pytest.mark.parametrize("config", CONFIGS)
def test_padding_mask_left_and_right_equals_unpadded(config):
    layer = make_layer(config)
    x = randn(3, 6, D_MODEL)
    y, state = layer(x, return_state=True)
    pads = [(3, 0), (0, 3), (1, 2)]
    padded, mask = _pad(x, pads)
    padded[mask == 0] = 5.0  # garbage in the padding must not leak
    y_padded, state_padded = layer(padded, attention_mask=mask, return_state=True)
    for b, (left, _) in enumerate(pads):
        assert_close(y_padded[b, left : left + 6], y[b])
    assert (y_padded[mask == 0] == 0).all()
    assert_states_close(state_padded, state)


def test_padding_in_the_middle_and_across_streamed_calls():
    layer = make_layer("mesanet")
    x = randn(2, 8, D_MODEL)
    y = layer(x)
    # First call: sequence 0 right-padded, sequence 1 left-padded; second call: padding inside the chunk.
    first = torch.zeros(2, 6, D_MODEL, dtype=x.dtype)
    first[0, :3], first[1, 2:] = x[0, :3], x[1, :4]
    mask1 = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    second = torch.full((2, 7, D_MODEL), 3.0, dtype=x.dtype)
    second[0, [0, 2, 3, 5, 6]] = x[0, 3:]
    second[1, [1, 2, 4, 5]] = x[1, 4:]
    mask2 = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 1, 1, 0]])
    y1, state = layer(first, attention_mask=mask1, return_state=True)
    y2 = layer(second, attention_mask=mask2, state=state)
    assert_close(y1[0, :3], y[0, :3])
    assert_close(y1[1, 2:], y[1, :4])
    assert_close(y2[0, [0, 2, 3, 5, 6]], y[0, 3:])
    assert_close(y2[1, [1, 2, 4, 5]], y[1, 4:])


def test_all_padding_call_leaves_state_unchanged():
    layer = make_layer("mesanet")
    _, state = layer(randn(2, 5, D_MODEL), return_state=True)
    y, same = layer(randn(2, 3, D_MODEL, seed=4), attention_mask=torch.zeros(2, 3), state=state, return_state=True)
    assert (y == 0).all()
    assert_states_close(same, state)


@pytest.mark.parametrize("config", ["default", "mesanet"])
def test_read_only_tokens_do_not_change_the_state(config):
    # Without the short convolution: that mixes neighbouring inputs, so it would see the read-only tokens.
    layer = make_layer(config, short_conv=False)
    context = randn(2, 6, D_MODEL)
    queries = randn(2, 3, D_MODEL, seed=9)
    y_context, state_context = layer(context, return_state=True)
    # Read-only queries interleaved with the context: positions 1, 4 and 8.
    x = torch.cat([context[:, :1], queries[:, :1], context[:, 1:3], queries[:, 1:2], context[:, 3:], queries[:, 2:]], 1)
    write = torch.ones(2, 9)
    write[:, [1, 4, 8]] = 0
    y, state = layer(x, write_mask=write, return_state=True)
    assert_close(y[:, [0, 2, 3, 5, 6, 7]], y_context)
    assert_states_close(state, state_context)
    # Each query reads the state left by the context before it, as if it were the next token but did not write.
    for position, n_context, query in ((1, 1, 0), (4, 3, 1), (8, 6, 2)):
        _, before = layer(context[:, :n_context], return_state=True)
        read = layer(queries[:, query : query + 1], write_mask=torch.zeros(2, 1), state=before)
        assert_close(y[:, position], read[:, 0])


def test_read_only_token_reads_previous_statistics():
    """write_mask = 0 is beta = 0: the token's output is G_{t-1} (H_{t-1} + Lambda)^{-1} q_t."""
    layer = make_layer("paper2023")
    x = randn(1, 5, D_MODEL)
    write = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    y = layer(x, write_mask=write)
    H, D = HEADS, D_MODEL // HEADS
    q, k, v = (proj(x).view(5, H, D) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    h = torch.einsum("shi,shj->hij", k[:4], k[:4]) + torch.diag_embed(layer.lam)
    g = torch.einsum("shi,shj->hij", v[:4], k[:4])
    expected = (g @ torch.linalg.solve(h, q[4, ..., None]))[..., 0]
    assert_close(y[0, 4], layer.o_proj(expected.reshape(H * D)))


def test_bf16_autocast_is_finite_and_keeps_the_state_in_float32():
    layer = make_layer("mesanet", dtype=torch.float32)
    x = randn(2, 8, D_MODEL, dtype=torch.float32) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x, return_state=True)
        y.float().square().mean().backward()
    assert torch.isfinite(y).all()
    assert state.h.dtype == torch.float32 and state.g.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(y.float(), layer(x), rtol=0.1, atol=0.1)


def test_zero_input_and_huge_values_stay_finite():
    layer = make_layer("mesanet", dtype=torch.float32)
    assert torch.isfinite(layer(torch.zeros(1, 4, D_MODEL))).all()
    assert torch.isfinite(layer(torch.full((1, 4, D_MODEL), 1e4))).all()


@pytest.mark.parametrize("config", ["default", "mesanet"])
def test_gradients_reach_every_parameter(config):
    layer = make_layer(config, short_conv=True, output_gate=True, bias=True)
    x = randn(2, 6, D_MODEL).requires_grad_()
    _, state = layer(randn(2, 2, D_MODEL, seed=3), return_state=True)
    layer(x, state=state).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_torch_compile_traces_the_layer():
    layer = make_layer("mesanet", dtype=torch.float32)
    x = randn(2, 5, D_MODEL, dtype=torch.float32)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.slow
def test_torch_compile_inductor_forward_and_backward():
    layer = make_layer("mesanet", dtype=torch.float32)
    x = randn(2, 5, D_MODEL, dtype=torch.float32)
    compiled = torch.compile(layer)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="divisible"):
        MesaLayer(10, 3)
    with pytest.raises(ValueError, match="lambda_init"):
        MesaLayer(12, 3, lambda_init=0.2, lambda_min=0.25)
    with pytest.raises(ValueError, match="lambda_min"):
        MesaLayer(12, 3, lambda_min=-1.0)
    with pytest.raises(ValueError, match="method"):
        MesaLayer(12, 3, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        MesaLayer(12, 3, chunk_size=0)
    with pytest.raises(ValueError, match="conv_size"):
        MesaLayer(12, 3, short_conv=True, conv_size=1)
    assert MesaLayer(10, 3, head_dim=4)(torch.randn(1, 2, 10)).shape == (1, 2, 10)


def test_forward_rejects_bad_inputs():
    layer = make_layer("mesanet", dtype=torch.float32)
    x = torch.randn(2, 4, D_MODEL)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 4, D_MODEL + 1))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(4, D_MODEL))
    with pytest.raises(ValueError, match="floating"):
        layer(torch.ones(2, 4, D_MODEL, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="write_mask"):
        layer(x, write_mask=torch.ones(4))
    _, state = layer(x, return_state=True)
    with pytest.raises(ValueError, match="state"):
        layer(x[:1], state=state)
    with pytest.raises(ValueError, match="conv"):
        layer(x, state=state._replace(conv=None))
    with pytest.raises(ValueError, match="MesaState"):
        layer(x, state=(state.h, state.g))
    with pytest.raises(ValueError, match="no short convolution"):
        make_layer(dtype=torch.float32)(x, state=state)


def _ddp_worker(rank: int, world_size: int, init_file: str, result_file: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same initial weights on every rank
    layer = MesaLayer(D_MODEL, HEADS, gated=True, short_conv=True, output_gate=True)
    model = DistributedDataParallel(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for _ in range(3):
        x = torch.randn(2, 6, D_MODEL, generator=generator)
        target = torch.randn(2, 6, D_MODEL, generator=generator)
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    params = torch.cat([p.detach().flatten() for p in layer.parameters()])
    gathered = [torch.empty_like(grads) for _ in range(world_size)]
    dist.all_gather(gathered, grads)
    gathered_params = [torch.empty_like(params) for _ in range(world_size)]
    dist.all_gather(gathered_params, params)
    if rank == 0:
        torch.save({"grads": gathered, "params": gathered_params}, result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_on_gradients():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), result_file), nprocs=2, join=True)
        result = torch.load(result_file)
    grads, params = result["grads"], result["params"]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(params[0], params[1])
