"""What the masking interventions cost in time: one model, one process, every variant timed in turn.

Separate processes on a shared CPU differ by up to about 10% in speed, more than the cost being measured, so this
script loads the model once and times the variants interleaved: each round runs every variant once (the order rotates
between rounds), and a variant's time is its fastest round. Variants: exact attention (SDPA, through
`hf_fna.exact`), then, through the `fna` backend, exact attention (`layers="none"`) without and with each
intervention (detection included), and FNA at its defaults without and with the "sink" intervention.

    python benchmarks/masking_cost.py --model hf_fna:clip-b16 --resolutions 448 896 --rounds 4 \
        --json benchmarks/results/clip/masking_cost.json --markdown benchmarks/results/clip/masking_cost.md
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from common import command_line, machine_info, wait_for_idle, write_results

VARIANTS = {  # name: (FNAConfig fields, or None for SDPA)
    "exact (SDPA)": None,
    "exact through the fna backend": {"layers": "none"},
    "exact + mask": {"layers": "none", "masking": {"intervention": "mask"}},
    "exact + sink": {"layers": "none", "masking": {"intervention": "sink"}},
    "exact + sink_keep_self": {"layers": "none", "masking": {"intervention": "sink_keep_self"}},
    "FNA (defaults)": {},
    "FNA + sink": {"masking": {"intervention": "sink"}},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_fna:clip-b16")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[448, 896])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)

    from transformers import AutoModel

    from hf_fna import FNAConfig, MaskingConfig
    from hf_fna.assets import photos
    from hf_fna.integration.towers import interpolation_kwargs
    from hf_fna.tools.measure import model_description, model_folder
    from hf_fna.tools.pipeline import ImagePreprocessing

    torch.set_num_threads(args.threads)
    path = model_folder(args.model)

    def load(fields: dict[str, Any] | None) -> torch.nn.Module:
        """One model per variant, so that no timed pass re-plans a model after `FNAConfig.apply`."""
        if fields is None:
            return AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        model = AutoModel.from_pretrained(path, attn_implementation="fna").eval()
        masking = MaskingConfig(**fields.get("masking", {}))
        return FNAConfig(**{**fields, "masking": masking}).apply(model)

    models = {name: load(fields) for name, fields in VARIANTS.items()}
    kwargs = interpolation_kwargs(models["exact (SDPA)"])
    images = photos("report")["image"][: args.batch]

    def run(name: str, pixels: torch.Tensor) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            models[name](pixel_values=pixels, **kwargs)
            return time.perf_counter() - start

    rows: list[dict[str, Any]] = []
    for size in args.resolutions:
        pixels = ImagePreprocessing.from_pretrained(path).pixels(images, size)
        names = list(models)
        for name in names:  # warm-up
            run(name, pixels)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            wait_for_idle()
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(run(name, pixels) / len(images))
            print(f"{size} px, round {round_index + 1}/{args.rounds} done", file=sys.stderr)
        base = min(times["exact (SDPA)"])
        for name in names:
            best = min(times[name])
            rows.append({"resolution": size, "variant": name, "seconds_per_image": best,
                         "all_rounds": times[name], "time_vs_exact": best / base})  # fmt: skip

    lines = [
        f"{model_description(args.model)}; batch {args.batch}, {args.rounds} interleaved rounds (fastest round).",
        "",
        "| px | variant | s / image | time vs exact (SDPA) |",
        "|---:|---|---:|---:|",
        *(
            f"| {r['resolution']} | {r['variant']} | {r['seconds_per_image']:.2f} | {r['time_vs_exact']:.2f}x |"
            for r in rows
        ),
    ]
    report = {"command": command_line(), "settings": vars(args), "machine": machine_info(), "rows": rows}
    write_results(report, "\n".join(lines) + "\n", args.json, args.markdown)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
