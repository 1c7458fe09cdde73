"""Part (b): fp64 eigh / thin SVD and bf16 / fp32 GEMM rates at a 7B model's widths."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from parts.shared import peak_gib

if TYPE_CHECKING:
    from smoke import Recorder


def run(spec: dict, work: Path, dry: bool, rec: Recorder) -> None:
    import torch

    dev = torch.device("cpu" if dry else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMM means fp32
    sync = (lambda: None) if dry else torch.cuda.synchronize

    def timed(fn: Callable[..., Any], reps: int, *args: Any, **kwargs: Any) -> float:
        """Best of ``reps`` calls of ``fn(*args, **kwargs)`` after a warm-up call; ``reps`` 0: the one call, timed
        (the largest sizes' decompositions, after a smaller size warmed the library up)."""
        if reps == 0:
            sync()
            t = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            return time.perf_counter() - t
        fn(*args, **kwargs)  # warm-up (cuBLAS / cuSOLVER handles, workspaces)
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    rows: list[dict] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in spec["sizes"]:
        row: dict[str, Any] = {"n": n}
        rows.append(row)
        for dtype, name in ((torch.bfloat16, "gemm_bf16"), (torch.float32, "gemm_fp32")):
            rec.doing(f"{name} n={n}")
            a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
            b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
            s = timed(torch.matmul, spec["reps"], a, b)
            row[name] = {"s": round(s, 5), "tflops": round(2 * n**3 / s / 1e12, 2)}
            del a, b
            rec.set(rows=rows)
        rec.doing(f"eigh fp64 n={n}")
        x = torch.randn(n, n, device=dev, dtype=torch.float64, generator=gen)
        spd = x @ x.T / n + torch.eye(n, device=dev, dtype=torch.float64)
        del x
        once = 1 if n == spec["sizes"][0] else 0  # the smallest size warms up, the others are timed once
        s = timed(torch.linalg.eigh, once, spd)
        row["eigh_fp64"] = {"s": round(s, 3)}
        del spd
        rec.set(rows=rows)
        m = spec["svd_rows"]
        rec.doing(f"svd fp64 {m}x{n}")
        w = torch.randn(m, n, device=dev, dtype=torch.float64, generator=gen)
        s = timed(torch.linalg.svd, once, w, full_matrices=False)
        row["svd_fp64"] = {"shape": [m, n], "s": round(s, 3)}
        del w
        rec.set(rows=rows)
    rec.set(notes="GEMM: best of reps after a warm-up, 2n^3 flops, TF32 off; eigh: torch.linalg.eigh (values and "
                  "vectors) of an SPD matrix; SVD: torch.linalg.svd, thin, of a "
                  f"{spec['svd_rows']} x n matrix; both timed once (the smallest size after a warm-up call)",
            peak_gpu_gib=peak_gib())


def summary_lines(r: dict) -> list[str]:
    """The numbers of part (b): a table, a row per size."""
    out = []
    g = r.get
    if g("rows"):
        out.append("| n | GEMM bf16 TFLOP/s | GEMM fp32 TFLOP/s | eigh fp64 s | SVD fp64 s (shape) |")
        out.append("|---|---|---|---|---|")
        for row in r["rows"]:
            def cell(key, field):
                return row[key][field] if key in row else "—"
            svd = f"{row['svd_fp64']['s']} ({row['svd_fp64']['shape'][0]}x{row['svd_fp64']['shape'][1]})" \
                if "svd_fp64" in row else "—"
            out.append(f"| {row['n']} | {cell('gemm_bf16', 'tflops')} | {cell('gemm_fp32', 'tflops')} | "
                       f"{cell('eigh_fp64', 's')} | {svd} |")
    return out
