"""Speed and memory of mesa attention against a sequential Sherman-Morrison loop and causal softmax attention.

For each sequence length T, at B = 1, 4 heads, head size 64, float32 (by default), it measures forward and
forward + backward wall time and peak memory for:

* ``chunk``: :func:`mesa_module.ops.mesa_attention` with ``method="chunk"`` (gamma = 1, the Woodbury path);
* ``chunk_gated``: MesaNet's form, a forget gate in [0.8, 0.99] and an input gate in [0.5, 1] (the eigen-Woodbury
  solver for gated inputs);
* ``chunk_packed`` and ``chunk_gated_packed``: the same two with the T tokens cut into documents
  (``cu_seqlens``) of random lengths, ``--doc-len`` tokens on average (each document starts a chunk of its own);
* ``naive``: the per-token direct-solve reference;
* ``sherman_morrison``: a Python loop over tokens carrying the inverse by rank-one updates (exact for
  gamma = 1 only), autograd through the loop;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on (B, H, T, d) inputs,
  its fastest layout;
* on CUDA, also fla's ``chunk_mesa_net`` (30 conjugate-gradient steps, bfloat16) when it is importable.

Timing is the minimum over ``--repeats`` runs after one warm-up (a single run when one call takes more than a
few seconds), in wall time or, with ``--clock cpu``, in process CPU time (for ``--threads 1`` on a machine whose
other processes keep the cores busy: wall time then mostly measures waiting for a core). Peak memory (``--memory``) is how much the call adds at its peak over what the process held when
it started:

* ``rss`` (default on Linux): the growth of the resident set, read as the kernel's high-water mark ``VmHWM``
  after resetting it (``/proc/self/clear_refs``) and returning freed heap memory to the system
  (``malloc_trim``), minus ``VmRSS`` at the start. It counts everything the call really touched - tensors, LAPACK
  workspaces, allocator fragmentation - and costs nothing to measure.
* ``profiler``: the largest sum of live torch tensor bytes, from the allocation and free events the torch
  profiler records with ``profile_memory=True``. Tensors only; the profiler itself needs gigabytes on the
  thousands-of-steps autograd loops of the baselines.

``tracemalloc`` would see none of it (torch allocates outside Python's allocator). On CUDA the number is
``torch.cuda.max_memory_allocated`` over the same baseline.

The forward's achieved GFLOP/s (the matrix products and factorisations the chunk algorithm executes, counted in
full, triangular products included; for SDPA the causal half of its two products) is compared with the rate of
a batched matrix product of the chunk algorithm's own shape, (B * H * T / 64) products of 64 x 64 matrices,
measured in the same run.

Run ``python benchmarks/mesa_attention.py`` for the full table (a few minutes on two cores) or
``python benchmarks/mesa_attention.py --quick`` for a short one; ``--help`` lists the flags.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mesa_module.ops import chunk as chunk_module
from mesa_module.ops import mesa_attention

logger = logging.getLogger("benchmarks.mesa_attention")

ALL_METHODS = ("chunk", "chunk_gated", "chunk_packed", "chunk_gated_packed", "naive", "sherman_morrison", "sdpa")
MESA_METHODS = ("chunk", "chunk_gated", "chunk_packed", "chunk_gated_packed", "naive")
DEFAULT_T = (512, 1024, 2048, 4096, 8192, 16384)
# Python loops over tokens get slow beyond these lengths; rows above them are skipped unless raised.
DEFAULT_CAPS = {"naive": 2048, "sherman_morrison": 4096}


def sherman_morrison_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mesa attention for gamma = beta = 1 by a sequential loop of rank-one inverse updates.

    ``R_t = (H_t + Lambda)^{-1} = R_{t-1} - R_{t-1} k k^T R_{t-1} / (1 + k^T R_{t-1} k)``, O(d^2) per token and
    head, exact for gamma = 1 (a forget gate on H without one on Lambda breaks the rank-one structure).

    Args:
        q, k: (B, T, H, Dk). v: (B, T, H, Dv). lam: (H, Dk) positive.

    Returns:
        o: (B, T, H, Dv).
    """
    B, T, H, Dk = q.shape
    r = torch.diag_embed((1.0 / lam).expand(H, Dk)).expand(B, H, Dk, Dk)
    g = q.new_zeros(B, H, v.shape[-1], Dk)
    outputs = []
    for t in range(T):
        k_t = k[:, t, :, :, None]
        rk = r @ k_t
        r = r - (rk @ rk.mT) / (1.0 + k_t.mT @ rk)
        g = g + v[:, t, :, :, None] * k_t.mT
        outputs.append((g @ (r @ q[:, t, :, :, None]))[..., 0])
    return torch.stack(outputs, dim=1)


def chunk_forward_flops(B: int, T: int, H: int, dk: int, dv: int, chunk: int) -> float:
    """Floating-point operations the chunk (Woodbury) forward executes, C x C products counted in full."""
    n = math.ceil(T / chunk) * chunk  # tokens including padding
    leaf = min(chunk_module.LEAF_SIZE, chunk)
    per_token = (
        2 * dv * dk  # value-statistic update per chunk
        + 2 * dk * dk  # key Gram per block
        + 2 * dk * dk
        + 2 * leaf * dk
        + leaf * leaf / 3
        + leaf * dk
        + 2 * dk * dk  # leaf factorisations, downdate
        + 2 * dk * dk
        + 4 * chunk * dk  # X = Q P - tril(Q W^T) W
        + 2 * chunk * dk
        + 2 * dk * dv
        + 2 * chunk * dv  # o = X G^T + tril(X K^T) V
    )
    blocks = math.ceil(T / chunk / max(1, chunk_module.MAX_STEPS_PER_BLOCK // math.ceil(chunk / leaf)))
    return B * H * (n * per_token + blocks * dk**3)


def sdpa_forward_flops(B: int, T: int, H: int, dk: int, dv: int) -> float:
    """The causal half of the two products Q K^T and P V."""
    return B * H * T * T * (dk + dv)


def document_offsets(T: int, mean_length: int, seed: int = 0) -> torch.Tensor:
    """``cu_seqlens`` cutting T tokens into documents of exponentially distributed lengths (at least one token)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(max(1, int(torch.empty(1).exponential_(1.0 / mean_length, generator=g).item())))
    lengths[-1] -= sum(lengths) - T
    lengths = [n for n in lengths if n > 0]
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def make_inputs(
    method: str, B: int, T: int, H: int, d: int, dtype: torch.dtype, device: str, grad: bool, doc_len: int = 256
):
    """Unit-norm queries and keys as the layer feeds them, Gaussian values, lam = 1; for the gated rows a forget gate
    in [0.8, 0.99] and an input gate in [0.5, 1]; for the packed rows document offsets."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)
    v = torch.randn(B, T, H, d, generator=g)
    extra = {}
    if method in ("sdpa", "fla"):
        # SDPA's fastest layout is (B, H, T, d); fla takes (B, T, H, d) in bfloat16.
        if method == "sdpa":
            q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        else:
            dtype = torch.bfloat16
            extra = dict(
                g=torch.zeros(B, T, H, device=device, dtype=dtype),
                beta=torch.ones(B, T, H, device=device, dtype=dtype),
                lamb=torch.ones(H, d, device=device, dtype=dtype),
            )
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_(grad) for x in (q, k, v))
    if method not in ("sdpa", "fla"):
        extra["lam"] = torch.ones(H, d, device=device, dtype=dtype, requires_grad=grad)
    if method in ("chunk_gated", "chunk_gated_packed"):
        extra["log_gamma"] = torch.log(0.8 + 0.19 * torch.rand(B, T, H, generator=g)).to(device=device, dtype=dtype)
        extra["beta"] = (0.5 + 0.5 * torch.rand(B, T, H, generator=g)).to(device=device, dtype=dtype)
    if method in ("chunk_packed", "chunk_gated_packed"):
        extra["cu_seqlens"] = document_offsets(B * T, doc_len).to(device)
        if B != 1:  # packed documents live in one row
            q, k, v = (x.reshape(1, B * T, H, d) for x in (q, k, v))
            for name in ("log_gamma", "beta"):
                if name in extra:
                    extra[name] = extra[name].reshape(1, B * T, H)
    return q, k, v, extra


def make_call(method: str, chunk_size: int):
    """A function ``call(q, k, v, extra)`` running one row's method (``recurrent`` too, outside the default rows)."""
    if method in (*MESA_METHODS, "recurrent"):
        name = method if method in ("naive", "recurrent") else "chunk"

        def call(q, k, v, extra):
            return mesa_attention(
                q,
                k,
                v,
                extra["lam"],
                beta=extra.get("beta"),
                log_gamma=extra.get("log_gamma"),
                cu_seqlens=extra.get("cu_seqlens"),
                method=name,
                chunk_size=chunk_size,
            )

        return call
    if method == "sherman_morrison":
        return lambda q, k, v, extra: sherman_morrison_attention(q, k, v, extra["lam"])
    if method == "sdpa":
        return lambda q, k, v, extra: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method == "fla":
        from fla.ops.mesa_net import chunk_mesa_net

        return lambda q, k, v, extra: chunk_mesa_net(q, k, v, extra["g"], extra["beta"], extra["lamb"])[0]
    raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# The clock measure_time reads: wall time by default; ``--clock cpu`` (process CPU time) for single-threaded runs
# on a machine whose other processes keep the cores busy, where wall time mostly measures waiting for a core.
CLOCK = time.perf_counter


def measure_time(run, device: str, repeats: int) -> float:
    """Minimum time in seconds (``CLOCK``); one warm-up, and a single run when a call takes over three seconds."""
    _sync(device)
    start = CLOCK()
    run()
    _sync(device)
    first = CLOCK() - start
    if first > 3.0:
        return first
    best = math.inf
    for _ in range(repeats):
        start = CLOCK()
        run()
        _sync(device)
        best = min(best, CLOCK() - start)
    return best


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_peak_bytes(run, device: str, how: str) -> float:
    """Peak bytes the call adds over what was held at its start (see the module docstring)."""
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    if how == "rss":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the baseline may then include cached free memory
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        base = _proc_status_bytes("VmRSS")
        run()
        return _proc_status_bytes("VmHWM") - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # Every allocation (+bytes) and free (-bytes) of torch's CPU allocator during the call, in time order.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def bmm_rate(B: int, T: int, H: int, d: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """GFLOP/s of the batched 64 x 64 matrix product the chunk algorithm is built from."""
    n = B * H * math.ceil(T / 64)
    a = torch.randn(n, 64, 64, device=device, dtype=dtype)
    b = torch.randn(n, 64, 64, device=device, dtype=dtype)
    seconds = measure_time(lambda: torch.bmm(a, b), device, max(repeats, 5))
    return 2 * n * 64**3 / seconds / 1e9


def benchmark_row(method, T, args, device):
    call = make_call(method, args.chunk_size)
    row = dict(device=device, method=method, T=T)
    shape = (args.batch, T, args.heads, args.dim, args.dtype, device)
    q, k, v, extra = make_inputs(method, *shape, grad=False, doc_len=args.doc_len)
    if "cu_seqlens" in extra:
        row["docs"] = len(extra["cu_seqlens"]) - 1

    def forward():
        with torch.no_grad():
            call(q, k, v, extra)

    row["fwd_s"] = measure_time(forward, device, args.repeats)
    qg, kg, vg, extra_g = make_inputs(method, *shape, grad=True, doc_len=args.doc_len)
    leaves = [t for t in (qg, kg, vg, *extra_g.values()) if t.requires_grad]

    def forward_backward():
        for t in leaves:
            t.grad = None
        call(qg, kg, vg, extra_g).sum().backward()

    row["fwdbwd_s"] = measure_time(forward_backward, device, args.repeats)
    if args.memory != "none":
        row["fwd_mb"] = measure_peak_bytes(forward, device, args.memory) / 2**20
        for t in leaves:
            t.grad = None  # the measured call allocates the gradients afresh, and they count
        row["fwdbwd_mb"] = measure_peak_bytes(forward_backward, device, args.memory) / 2**20
    flops = None
    if method == "chunk":
        flops = chunk_forward_flops(args.batch, T, args.heads, args.dim, args.dim, args.chunk_size)
    elif method == "sdpa":
        flops = sdpa_forward_flops(args.batch, T, args.heads, args.dim, args.dim)
    row["fwd_gflops"] = flops / row["fwd_s"] / 1e9 if flops else None
    return row


def format_table(rows, rates):
    head = (
        f"{'device':<6} {'T':>6} {'method':<19} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd MiB':>8} "
        f"{'f+b MiB':>8} {'fwd GFLOP/s':>11} {'% of bmm':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = r.get("fwd_gflops")
        bmm = rates.get((r["device"], r["T"]))
        lines.append(
            f"{r['device']:<6} {r['T']:>6} {r['method']:<19} {r['fwd_s'] * 1e3:>9.1f} {r['fwdbwd_s'] * 1e3:>11.1f} "
            f"{r.get('fwd_mb', float('nan')):>8.1f} {r.get('fwdbwd_mb', float('nan')):>8.1f} "
            f"{'' if rate is None else f'{rate:.1f}':>11} {'' if rate is None or not bmm else f'{100 * rate / bmm:.0f}%':>8}"
        )
    lines.append("")
    lines.append("batched-matmul rate, (B*H*T/64) products of 64x64 matrices, same run:")
    for (device, T), rate in sorted(rates.items()):
        lines.append(f"  {device:<6} T={T:>6}: {rate:.1f} GFLOP/s")
    return "\n".join(lines)


def summarise(rows):
    """The target ratios, where both sides were measured."""
    by = {(r["device"], r["method"], r["T"]): r for r in rows}
    lines = []
    comparisons = [
        ("chunk", "sherman_morrison", 4096),
        ("chunk", "sdpa", 4096),
        ("chunk", "sdpa", 16384),
        ("chunk_gated", "sdpa", 4096),
        ("chunk_gated", "sdpa", 16384),
        ("chunk_gated", "chunk", 4096),
        ("chunk_packed", "chunk", 4096),
        ("chunk_gated_packed", "chunk_gated", 4096),
    ]
    for device in sorted({r["device"] for r in rows}):
        for method, other, T in comparisons:
            a, b = by.get((device, method, T)), by.get((device, other, T))
            if a and b:
                ratio = b["fwdbwd_s"] / a["fwdbwd_s"]
                speed = f"{ratio:.2f}x the speed of" if ratio < 1 else f"{ratio:.2f}x faster than"
                lines.append(
                    f"{device} T={T}: {method} fwd+bwd is {speed} {other} (forward {b['fwd_s'] / a['fwd_s']:.2f}x)"
                )
        for r in rows:
            if r["device"] == device and "docs" in r:
                lines.append(
                    f"{device} T={r['T']}: {r['method']} packs {r['docs']} document(s), {r['T'] / r['docs']:.0f} tokens "
                    "on average"
                )
        chunk_rows = sorted((r for r in rows if r["device"] == device and r["method"] == "chunk"), key=lambda r: r["T"])
        if len(chunk_rows) >= 2 and "fwdbwd_mb" in chunk_rows[0]:
            first, last = chunk_rows[0], chunk_rows[-1]
            lines.append(
                f"{device}: chunk fwd+bwd memory {first['fwdbwd_mb']:.1f} MiB at T={first['T']} -> "
                f"{last['fwdbwd_mb']:.1f} MiB at T={last['T']} ({last['fwdbwd_mb'] / first['fwdbwd_mb']:.1f}x for "
                f"{last['T'] / first['T']:.0f}x the tokens)"
            )
    return "\n".join(lines)


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fwd_s", "forward time (s)"), ("fwdbwd_s", "forward + backward time (s)")]
    if any("fwdbwd_mb" in r for r in rows):
        panels += [("fwd_mb", "forward peak memory (MiB)"), ("fwdbwd_mb", "forward + backward peak memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    series = sorted({(r["device"], r["method"]) for r in rows})
    for ax, (key, label) in zip(axes, panels, strict=True):
        for device, method in series:
            pts = sorted((r["T"], r[key]) for r in rows if r["device"] == device and r["method"] == method and key in r)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{method} ({device})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mesa attention vs Sherman-Morrison loop vs causal SDPA (B=1, H=4, d=64)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T), help="sequence lengths")
    p.add_argument("--max-T", type=int, default=None, help="drop lengths above this")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--naive-max-T", type=int, default=DEFAULT_CAPS["naive"], help="skip naive above this T")
    p.add_argument("--sm-max-T", type=int, default=DEFAULT_CAPS["sherman_morrison"], help="skip the loop above this T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head size (queries, keys and values)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--doc-len", type=int, default=256, help="mean document length of the packed rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (with --threads 1 on a busy machine: time spent, not time waited)",
    )
    p.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, plus cuda when available)")
    default_memory = "rss" if os.access("/proc/self/clear_refs", os.W_OK) else "profiler"
    p.add_argument(
        "--memory", choices=["rss", "profiler", "none"], default=default_memory, help="how to measure peak memory"
    )
    p.add_argument("--quick", action="store_true", help="T up to 2048, one repeat, no memory")
    p.add_argument("--plot", type=Path, default=Path("runs/mesa_attention.png"), help="where to write the plot")
    args = p.parse_args(argv)
    if args.quick:
        args.T = [t for t in args.T if t <= 2048]
        args.repeats, args.memory = 1, "none"
    if args.max_T is not None:
        args.T = [t for t in args.T if t <= args.max_T]
    args.dtype = getattr(torch, args.dtype)
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()[0]
    logger.info("torch %s, %d threads, devices %s", torch.__version__, torch.get_num_threads(), args.device)
    rows, rates, notes = [], {}, []
    for device in args.device:
        methods = list(args.methods)
        if device.startswith("cuda"):
            try:
                import fla.ops.mesa_net  # noqa: F401

                methods.append("fla")
            except ImportError:
                notes.append("fla is not importable: no chunk_mesa_net rows")
        for T in args.T:
            rates[(device, T)] = bmm_rate(args.batch, T, args.heads, args.dim, args.dtype, device, args.repeats)
            for method in methods:
                cap = {"naive": args.naive_max_T, "sherman_morrison": args.sm_max_T}.get(method)
                if cap is not None and T > cap:
                    notes.append(f"{method} skipped at T={T} (above its cap {cap}; raise it with a flag)")
                    continue
                if method == "fla" and args.dtype != torch.float32:
                    continue
                row = benchmark_row(method, T, args, device)
                logger.info(
                    "%s T=%d %s: fwd %.1f ms, fwd+bwd %.1f ms",
                    device,
                    T,
                    method,
                    row["fwd_s"] * 1e3,
                    row["fwdbwd_s"] * 1e3,
                )
                rows.append(row)
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs; 1-minute load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes make OpenMP threads "
        "wait for each other: compare at --threads 1 on a busy machine); peak memory by "
        f"{args.memory!r}; {args.clock} clock"
    )
    print(format_table(rows, rates))
    print()
    print(summarise(rows))
    for note in notes:
        print("note:", note)
    plot(rows, args.plot)
    print(f"plot written to {args.plot}")
    return rows


if __name__ == "__main__":
    main()
