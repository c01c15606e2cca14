"""Op-level benchmark: `hf_fna.fna_attention` against `scaled_dot_product_attention` and eager attention.

Inputs are `[B, H, N, d]` views of `[B, N, H, d]` tensors, as Transformers passes them to an attention function.
FNA is timed with landmark selection (FPS on the mean query, the CLS token guaranteed) and without it (precomputed
`landmarks=`). Selection alone is timed for hf-fna's FPS and, when `torch-quickfps` is installed, for the paper's
sampler (`sampling="quickfps"`, the same call the paper's code makes). Eager attention (matmul, softmax, matmul) is
skipped where its `[B, H, N, N]` matrix would exceed `--eager-max-gib`. The FLOP bound is exact attention's 4 N^2 d
FLOPs per head over FNA's 8 N m d + 2 m^2 d (landmark kernel) + 48 m^3 (6 Newton-Schulz steps).

    python benchmarks/bench_op.py --json benchmarks/results/op_cpu.json --markdown benchmarks/results/op_cpu.md
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

import torch
import torch.nn.functional as F
from common import add_report_arguments, machine_info, pick_device, report, time_call

import hf_fna
from hf_fna.ops.landmarks import select_landmarks

SIZES = (197, 257, 577, 1025, 2049, 4097, 8193, 16385)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    return ((query @ key.transpose(-1, -2)) * scale).softmax(dim=-1) @ value


def flop_bound(tokens: int, head_dim: int, landmarks: int, pinv_iterations: int = 6) -> float:
    m = min(landmarks, tokens)
    exact = 4 * tokens**2 * head_dim
    return exact / (8 * tokens * m * head_dim + 2 * m * m * head_dim + 8 * pinv_iterations * m**3)


def bench_size(args: argparse.Namespace, tokens: int, device: torch.device) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device="cpu").manual_seed(tokens)
    shape = (args.batch, tokens, args.heads, args.head_dim)
    query, key, value = (torch.randn(shape, generator=generator).to(device, dtype).transpose(1, 2) for _ in range(3))
    scale = args.head_dim**-0.5
    m = min(args.landmarks, tokens)
    with torch.inference_mode():
        landmarks = select_landmarks(query.mean(dim=1), m, num_special_tokens=1)
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(query, key, value, scale=scale),
        "fna": lambda: hf_fna.fna_attention(query, key, value, m, scale=scale, num_special_tokens=1),
        "fna_given_landmarks": lambda: hf_fna.fna_attention(query, key, value, m, scale=scale, landmarks=landmarks),
        "selection": lambda: select_landmarks(query.mean(dim=1), m, num_special_tokens=1),
    }
    if importlib.util.find_spec("torch_quickfps") is not None:
        calls["selection_quickfps"] = lambda: select_landmarks(
            query.mean(dim=1), m, method="quickfps", num_special_tokens=1
        )
    matrix_gib = args.batch * args.heads * tokens**2 * torch.finfo(dtype).bits / 8 / 2**30
    if matrix_gib <= args.eager_max_gib:
        calls["eager"] = lambda: eager_attention(query, key, value, scale)
    row: dict[str, Any] = {"tokens": tokens, "flop_bound": flop_bound(tokens, args.head_dim, m)}
    for name, fn in calls.items():
        row[name] = time_call(
            fn, device, args.warmup, args.repeats, min_seconds=args.min_seconds, max_idle_wait=args.max_idle_wait
        )
    with torch.inference_mode():
        exact = calls["sdpa"]()
        approx = calls["fna_given_landmarks"]()
        row["max_abs_error_vs_sdpa"] = float((approx.float() - exact.float()).abs().max())
    for name in ("fna", "fna_given_landmarks", "eager"):
        if name in row:
            row[f"speedup_{name}"] = row["sdpa"]["min"] / row[name]["min"]
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| N | sdpa ms | eager ms | fna ms | fna ms (landmarks given) | selection ms | quickfps selection ms "
        "| speed-up fna | speed-up fna (given) | FLOP bound | fraction of bound |",
        "|" + "---:|" * 11,
    ]
    for r in rows:
        ms = {
            k: f"{1e3 * r[k]['min']:.2f}" if k in r else "skipped"
            for k in ("sdpa", "eager", "fna", "fna_given_landmarks", "selection", "selection_quickfps")
        }
        lines.append(
            f"| {r['tokens']} | {ms['sdpa']} | {ms['eager']} | {ms['fna']} | {ms['fna_given_landmarks']} "
            f"| {ms['selection']} | {ms['selection_quickfps']} | {r['speedup_fna']:.2f}x "
            f"| {r['speedup_fna_given_landmarks']:.2f}x "
            f"| {r['flop_bound']:.1f}x | {r['speedup_fna_given_landmarks'] / r['flop_bound']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="sequence lengths N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls at least (the table shows the minimum)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="keep timing until this much time has passed")
    parser.add_argument("--eager-max-gib", type=float, default=1.0, help="skip eager above this attention matrix")
    add_report_arguments(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    machine = machine_info(device)
    rows = []
    for tokens in args.sizes:
        rows.append(bench_size(args, tokens, device))
        print(
            f"N={tokens}: sdpa {1e3 * rows[-1]['sdpa']['min']:.2f} ms, fna {1e3 * rows[-1]['fna']['min']:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
    caption = (
        f"B={args.batch}, H={args.heads}, d={args.head_dim}, m={args.landmarks}, {args.dtype}; minimum of the timed "
        "calls; FNA output is a [B, N, H, d]-laid-out tensor like SDPA's"
    )
    report(args, device, machine, rows, markdown_table(rows), caption)
    return 0


if __name__ == "__main__":
    sys.exit(main())
