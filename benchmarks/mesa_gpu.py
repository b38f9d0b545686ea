"""One prepared check of mesa attention on an accelerator: correctness of every method there, then its speed.

1. **Correctness.** Every method (``naive``, ``chunk``, ``recurrent``, ``auto``) runs on the device in float32 and
   float64, ungated, gated (forget and input gate), packed (``cu_seqlens``, per-document initial states) and packed
   and gated, and is compared with the reference, ``naive`` in float64 on the CPU: outputs, final states and the
   gradients of every input (q, k, v, lam, beta, log_gamma, initial states). Tolerances: relative error 1e-10 in
   float64; 1e-5 (outputs and states) and 1e-4 (gradients) in float32. Also ``chunk`` with bfloat16 inputs under
   bfloat16 autocast (states stay float32): 2e-2.
2. **Speed.** Forward and forward + backward time of ``chunk`` (ungated, gated, packed, packed and gated),
   ``recurrent`` and ``naive`` (capped lengths: they loop over tokens) against
   ``scaled_dot_product_attention(is_causal=True)``, at B = 1, 4 heads, d = 64, T = 1,024 ... 16,384, in float32
   and under bfloat16 autocast (bfloat16 q, k, v; SDPA then takes its bfloat16 kernels, mesa attention computes in
   float32 inside), with peak memory on CUDA. fla's ``chunk_mesa_net`` joins when it is importable.

``python benchmarks/mesa_gpu.py`` on a CUDA machine (a few minutes: ``--budget``, 240 s, bounds the speed part);
``python benchmarks/mesa_gpu.py --device cpu --quick`` runs the same code small on the CPU. It prints Markdown tables
and writes them with the raw figures to ``--out`` (JSON); the exit status is 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mesa_attention as op_bench  # noqa: E402  (benchmarks/mesa_attention.py: inputs, calls, timing)

from mesa_module.ops import mesa_attention  # noqa: E402

METHODS = ("naive", "chunk", "recurrent", "auto")
CASES = ("ungated", "gated", "packed", "packed_gated")
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}  # (outputs and states, gradients)
SPEED_ROWS = ("sdpa", "chunk", "chunk_gated", "chunk_packed", "chunk_gated_packed", "recurrent", "naive")
# Token loops launch a dozen kernels per token: beyond these lengths their rows are skipped.
SPEED_CAPS = {"naive": 1024, "recurrent": 2048}


def correctness_inputs(case: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Small inputs of one case on the CPU: unit-norm q and k, lam in [0.5, 1.5], initial states."""
    g = torch.Generator().manual_seed(seed)
    packed = case.startswith("packed")
    lengths = [37, 1, 0, 70, 12] if packed else None
    B, T, H, Dk, Dv = (1, sum(lengths), 2, 16, 12) if packed else (2, 120, 2, 16, 12)
    lead = len(lengths) if packed else B

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    keys = randn(lead, H, 2 * Dk, Dk)
    x = dict(
        q=F.normalize(randn(B, T, H, Dk), dim=-1),
        k=F.normalize(randn(B, T, H, Dk), dim=-1),
        v=randn(B, T, H, Dv),
        lam=0.5 + torch.rand(H, Dk, generator=g, dtype=torch.float64),
        beta=None,
        log_gamma=None,
        h0=keys.mT @ keys / Dk,
        g0=randn(lead, H, Dv, Dk),
    )
    if case in ("gated", "packed_gated"):
        x["beta"] = torch.rand(B, T, H, generator=g, dtype=torch.float64)
        x["log_gamma"] = torch.log(0.8 + 0.19 * torch.rand(B, T, H, generator=g, dtype=torch.float64))
    x = {name: None if t is None else t.to(dtype) for name, t in x.items()}
    x["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if packed else None
    return x


def run_with_grads(inputs: dict, method: str, device: str, weights: list[torch.Tensor]):
    """Outputs, final states and gradients of ``sum(w * (o, H_T, G_T))`` for every floating-point input."""
    leaves = {
        name: t.detach().to(device).requires_grad_()
        for name, t in inputs.items()
        if name != "cu_seqlens" and t is not None
    }
    cu = inputs["cu_seqlens"]
    o, (h, g) = mesa_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["lam"],
        beta=leaves.get("beta"),
        log_gamma=leaves.get("log_gamma"),
        initial_state=(leaves["h0"], leaves["g0"]),
        output_final_state=True,
        method=method,
        chunk_size=16,
        cu_seqlens=None if cu is None else cu.to(device),
    )
    outputs = (o, h, g)
    loss = sum((t * w.to(device=device, dtype=t.dtype)).sum() for t, w in zip(outputs, weights, strict=True))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [t.detach().cpu().double() for t in outputs], {
        n: d.cpu().double() for n, d in zip(leaves, grads, strict=True)
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_correctness(device: str) -> list[dict]:
    """Every (case, dtype, method) on the device against naive float64 on the CPU."""
    results = []
    for case in CASES:
        inputs64 = correctness_inputs(case, torch.float64)
        g = torch.Generator().manual_seed(1)
        shapes = [(*inputs64["q"].shape[:3], inputs64["v"].shape[-1]), inputs64["h0"].shape, inputs64["g0"].shape]
        weights = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
        ref_out, ref_grads = run_with_grads(inputs64, "naive", "cpu", weights)
        for dtype in (torch.float64, torch.float32):
            inputs = correctness_inputs(case, dtype)
            for method in METHODS:
                start = time.perf_counter()
                out, grads = run_with_grads(inputs, method, device, weights)
                err_out = max(rel_err(a, b) for a, b in zip(out, ref_out, strict=True))
                err_grad = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
                tol_out, tol_grad = TOLERANCE[dtype]
                results.append(
                    dict(
                        case=case,
                        dtype=str(dtype).removeprefix("torch."),
                        method=method,
                        err_out=err_out,
                        err_grad=err_grad,
                        ok=err_out <= tol_out and err_grad <= tol_grad,
                        seconds=time.perf_counter() - start,
                    )
                )
    # bfloat16 q, k, v under autocast: only their rounding separates the result from the fp32 one.
    for case in ("gated", "packed_gated"):
        x = correctness_inputs(case, torch.float32)
        ref = run_with_grads(x, "naive", "cpu", [torch.zeros(1)] * 3)[0][0]
        half = {n: t.to(device=device, dtype=torch.bfloat16) if n in ("q", "k", "v") else t for n, t in x.items()}
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            o, (h, _) = mesa_attention(
                half["q"],
                half["k"],
                half["v"],
                x["lam"].to(device),
                beta=x["beta"].to(device),
                log_gamma=x["log_gamma"].to(device),
                initial_state=(x["h0"].to(device), x["g0"].to(device)),
                output_final_state=True,
                method="chunk",
                cu_seqlens=None if x["cu_seqlens"] is None else x["cu_seqlens"].to(device),
            )
        err = rel_err(o.float().cpu().double(), ref)
        ok = o.dtype == torch.bfloat16 and h.dtype == torch.float32 and err <= 2e-2
        results.append(dict(case=case, dtype="bf16 autocast", method="chunk", err_out=err, err_grad=math.nan, ok=ok))
    return results


def measure_speed(device: str, Ts: list[int], repeats: int, budget: float, chunk_size: int) -> tuple[list, list]:
    """Forward and forward + backward seconds (and peak MiB on CUDA) of every speed row, fp32 and bf16 autocast."""
    rows, notes = [], []
    methods = list(SPEED_ROWS)
    if device.startswith("cuda"):
        try:
            import fla.ops.mesa_net  # noqa: F401

            methods.append("fla")
        except ImportError:
            notes.append("fla is not importable: no chunk_mesa_net rows")
    deadline = time.perf_counter() + budget
    for precision in ("fp32", "bf16"):
        for T in Ts:
            for method in methods:
                if T > SPEED_CAPS.get(method, math.inf):
                    continue
                if method == "fla" and precision == "fp32":
                    continue  # fla's kernels take bfloat16
                if time.perf_counter() > deadline:
                    notes.append(f"time budget spent: {precision} T={T} {method} and later rows skipped")
                    return rows, notes
                rows.append(speed_row(method, T, precision, device, repeats, chunk_size))
    return rows, notes


def speed_row(method: str, T: int, precision: str, device: str, repeats: int, chunk_size: int) -> dict:
    call = op_bench.make_call(method, chunk_size)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    row = dict(method=method, T=T, precision=precision)
    for grad in (False, True):
        q, k, v, extra = op_bench.make_inputs(method, 1, T, 4, 64, torch.float32, device, grad=grad)
        if precision == "bf16":
            q, k, v = (x.detach().bfloat16().requires_grad_(grad) for x in (q, k, v))
        leaves = [t for t in (q, k, v, *extra.values()) if isinstance(t, torch.Tensor) and t.requires_grad]

        def run(q=q, k=k, v=v, extra=extra, grad=grad, leaves=leaves):
            for t in leaves:
                t.grad = None
            with torch.set_grad_enabled(grad), autocast:
                out = call(q, k, v, extra)
            if grad:
                out.float().sum().backward()

        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        seconds = op_bench.measure_time(run, device, repeats)
        key = "fwdbwd" if grad else "fwd"
        row[f"{key}_ms"] = seconds * 1e3
        if device.startswith("cuda"):
            row[f"{key}_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def correctness_table(results: list[dict]) -> str:
    lines = [
        "| case | dtype | method | max rel. error (o, H_T, G_T) | max rel. error (gradients) | ok |",
        "|---" * 6 + "|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['method']} | {r['err_out']:.1e} | {r['err_grad']:.1e} | "
            f"{'yes' if r['ok'] else '**NO**'} |"
        )
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    """One line per (precision, T): fwd / fwd+bwd ms of every row, and the ratio SDPA / method for fwd+bwd."""
    methods = [m for m in (*SPEED_ROWS, "fla") if any(r["method"] == m for r in rows)]
    lines = [
        "| precision | T | " + " | ".join(f"{m} fwd / f+b ms" for m in methods) + " | f+b speed vs SDPA |",
        "|---" * (len(methods) + 3) + "|",
    ]
    keys = sorted({(r["precision"], r["T"]) for r in rows}, key=lambda x: (x[0] != "fp32", x[1]))
    by = {(r["precision"], r["T"], r["method"]): r for r in rows}
    for precision, T in keys:
        cells, ratios = [], []
        sdpa = by.get((precision, T, "sdpa"))
        for m in methods:
            r = by.get((precision, T, m))
            cells.append("-" if r is None else f"{r['fwd_ms']:.1f} / {r['fwdbwd_ms']:.1f}")
            if r is not None and sdpa is not None and m != "sdpa":
                ratios.append(f"{m} {sdpa['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x")
        lines.append(f"| {precision} | {T:,} | " + " | ".join(cells) + " | " + ", ".join(ratios) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--T", type=int, nargs="+", default=None, help="lengths (default 1,024 ... 16,384)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the speed part; later rows are skipped")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="T = 128 and 256, one repeat")
    p.add_argument("--skip-speed", action="store_true", help="correctness only")
    p.add_argument("--out", type=Path, default=Path("runs/mesa_gpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.T is None:
        args.T = [128, 256] if args.quick else [1024, 2048, 4096, 8192, 16384]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; pass --device cpu")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    header = f"{datetime.date.today().isoformat()}, {name}, torch {torch.__version__}" + (
        f", CUDA {torch.version.cuda}" if device.startswith("cuda") else f", {torch.get_num_threads()} threads"
    )
    print(header, flush=True)
    start = time.perf_counter()
    results = check_correctness(device)
    print(f"\n## Correctness on {device} against naive float64 on the CPU ({time.perf_counter() - start:.0f} s)\n")
    print(correctness_table(results), flush=True)
    rows, notes = [], []
    if not args.skip_speed:
        start = time.perf_counter()
        rows, notes = measure_speed(device, args.T, args.repeats, args.budget, args.chunk_size)
        print(f"\n## Speed on {device}, B = 1, 4 heads, d = 64 ({time.perf_counter() - start:.0f} s)\n")
        print(speed_table(rows))
        for note in notes:
            print("note:", note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(header=header, correctness=results, speed=rows, notes=notes), indent=1))
    print(f"\nwritten to {args.out}")
    failed = [r for r in results if not r["ok"]]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
