"""Fidelity sweep of FNA layer schedules, landmark counts and options on a real model and the bundled photos.

For each configuration the last hidden state and the pooled embedding of the photos are compared with exact
attention's: mean patch-token cosine (over the photos), the worst photo's mean patch cosine, the CLS cosine, the
cosine of the pooled embedding (CLIP's `image_embeds`, DINOv2's pooler output), and how many of the massive tokens
(norm above 10x the median token norm) entering the layer where the last group selects its landmarks are among
those landmarks. Speed is given by the FLOP bound of `hf_fna.ops.cost.schedule_flop_bound` (measured throughput
tracks it at high resolution, see bench_model.py); this script measures no time, so it can run on a busy machine.

Settings are chosen on the "tune" photos (the default) and reported on the "report" photos (`--split report`).
A configuration is `SCHEDULE@M`, optionally followed by `/field=value` FNAConfig options, e.g. `6:@64`,
`6:@64/resample_every_layer=true`, `6:@64/sampling_features=k`, `6:@64/sampling=quickfps`, `6:@64/fps_start=first`.

    python benchmarks/sweep_schedules.py --json benchmarks/results/sweep_896_tune.json \
        --markdown benchmarks/results/sweep_896_tune.md --plot benchmarks/results/sweep_896_tune.png
    python benchmarks/sweep_schedules.py --model hf_fna:clip-b16 --resolution 448 --configs 6:@64 8:@64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from common import command_line, config_name, load_saved_model, machine_info, parse_config, write_results
from tqdm.auto import tqdm

import hf_fna
from hf_fna.integration.towers import interpolation_kwargs, mlp_ratio_of, special_tokens
from hf_fna.ops.cost import schedule_flop_bound
from hf_fna.schedules import parse_layers

SCHEDULES_64 = [f"{first}:" for first in range(12)] + ["0:2", "0:3", "0:4", "0,1,11", "0,1,10,11", "0,1,2,10,11"]
SCHEDULES_OTHER = ["4:", "6:", "8:", "10:", "0,1,10,11"]
OPTIONS = ["resample_every_layer=true", "sampling_features=k", "sampling_features=hidden", "sampling=quickfps"]
MASSIVE_RATIO = 10.0  # massive tokens: norm above this multiple of the median token norm


def pooled(output: Any) -> torch.Tensor:
    """The model's image-level embedding: `image_embeds` (CLIP with projection), else the pooler output."""
    embeds = getattr(output, "image_embeds", None)
    return embeds if embeds is not None else output.pooler_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="hf_fna:dinov2-small", help="hf_fna:dinov2-small, hf_fna:clip-b16 or a model folder"
    )
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

    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from hf_fna.assets import photos
    from hf_fna.tools.measure import model_description, model_folder
    from hf_fna.tools.pipeline import ImagePreprocessing

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.configs:
        configs = [parse_config(text) for text in args.configs]
    else:
        configs = [(s, 64, {}) for s in SCHEDULES_64] + [(s, m, {}) for m in (32, 128, 256) for s in SCHEDULES_OTHER]
        configs += [parse_config(f"6:@64/{option}") for option in OPTIONS]
    path = model_folder(args.model)
    data = photos(None if args.split == "all" else args.split)
    pixels = ImagePreprocessing.from_pretrained(path).pixels(data["image"], args.resolution)
    batches = pixels.split(args.batch)

    def run(model: torch.nn.Module, hidden: bool = False) -> dict[str, Any]:
        """Last hidden states, pooled embeddings and (with `hidden`) every hidden state; landmarks per batch."""
        kwargs = interpolation_kwargs(model)
        outputs, landmarks = [], []
        with torch.inference_mode():
            for batch in batches:
                outputs.append(model(pixel_values=batch, output_hidden_states=hidden, **kwargs))
                landmarks.append(hf_fna.last_landmarks(model) if not hidden else None)
        result = {
            "last": torch.cat([o.last_hidden_state for o in outputs]),
            "pooled": torch.cat([pooled(o) for o in outputs]),
            "landmarks": None if hidden or landmarks[0] is None else torch.cat(landmarks),
        }
        if hidden:
            layers = range(model.config.num_hidden_layers)  # hidden state i enters layer i
            result["hidden"] = [torch.cat([o.hidden_states[i] for o in outputs]) for i in layers]
        return result

    rows: list[dict[str, Any]] = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    done = {r["config"] for r in rows}
    todo = [c for c in configs if config_name(*c) not in done]
    if todo:
        reference = run(load_saved_model(path, "sdpa"), hidden=True)
        tokens = reference["last"].shape[1]
        model = load_saved_model(path, "fna")
        num_layers = model.config.num_hidden_layers
        special = special_tokens(model.config).leading
    for schedule, landmarks, options in tqdm(todo, desc="schedules"):
        fna_config = hf_fna.FNAConfig(layers=parse_layers(schedule), num_landmarks=landmarks, min_tokens=0, **options)
        fna_config.apply(model)
        result = run(model)
        cosine = torch.nn.functional.cosine_similarity(result["last"], reference["last"], dim=-1)
        per_photo = cosine[:, special:].mean(dim=1)
        pooled_cosine = torch.nn.functional.cosine_similarity(result["pooled"], reference["pooled"], dim=-1)
        row = {
            "config": config_name(schedule, landmarks, options),
            "schedule": schedule,
            "landmarks": landmarks,
            "options": options,
            "photos": list(data["name"]),
            "fna_layers": fna_config.resolve(num_layers).fna_layers,
            "tokens": tokens,
            "patch_cosine": float(per_photo.mean()),
            "worst_photo_patch_cosine": float(per_photo.min()),
            "cls_cosine": float(cosine[:, 0].mean()),
            "pooled_cosine": float(pooled_cosine.mean()),
            "worst_photo_pooled_cosine": float(pooled_cosine.min()),
            "per_photo_patch_cosine": [round(float(v), 4) for v in per_photo],
        }
        if result["landmarks"] is not None:
            # Massive tokens entering the layer where the last group selected its landmarks, and how many were picked.
            selection_layer = fna_config.resolve(num_layers).groups[-1].first_layer
            norms = reference["hidden"][selection_layer].norm(dim=-1)
            massive = norms > MASSIVE_RATIO * norms[:, special:].median(dim=1, keepdim=True).values
            massive[:, :special] = False
            picked = torch.zeros_like(massive).scatter(1, result["landmarks"], True)
            row["selection_layer"] = selection_layer
            row["massive_tokens"] = int(massive.sum())
            row["massive_among_landmarks"] = int((massive & picked).sum())
        rows.append(row)
        if args.json:  # saved after every configuration: an interrupted sweep keeps its rows
            write_results({"command": command_line(), "settings": vars(args), "rows": rows}, "", args.json, None)

    config = AutoConfig.from_pretrained(path)  # the shape only: no model is loaded for it
    width, heads, num_layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    for r in rows:  # computed here for resumed rows too, so that every row follows the current cost model
        fna_config = hf_fna.FNAConfig(layers=parse_layers(r["schedule"]), num_landmarks=r["landmarks"], **r["options"])
        per_layer = fna_config.resolve(num_layers).landmarks_per_layer(r["tokens"])
        r["flop_bound"] = schedule_flop_bound(r["tokens"], width, heads, per_layer, mlp_ratio_of(config))
    rows.sort(key=lambda r: (r["landmarks"], -r["flop_bound"], -r["patch_cosine"]))
    lines = [
        "| schedule | m | options | FNA layers | FLOP bound | patch cos | worst photo | CLS cos | pooled cos "
        "| massive tokens picked | >= 0.97 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in _flat_options(r["options"]).items())
        massive = f"{r['massive_among_landmarks']} / {r['massive_tokens']}" if "massive_tokens" in r else "-"
        pooled_text = f"{r['pooled_cosine']:.4f}" if "pooled_cosine" in r else "-"
        lines.append(
            f"| {r['schedule']} | {r['landmarks']} | {options} | {len(r['fna_layers'])} | {r['flop_bound']:.2f}x "
            f"| {r['patch_cosine']:.4f} | {r['worst_photo_patch_cosine']:.4f} | {r['cls_cosine']:.4f} "
            f"| {pooled_text} | {massive} | {'yes' if r['patch_cosine'] >= 0.97 else ''} |"
        )
    table = "\n".join(lines)
    machine = machine_info("cpu")
    tokens = rows[0]["tokens"]
    title = f"{args.resolution} px ({tokens} tokens), {len(data)} {args.split} photos"
    print(f"{title}, {model_description(args.model)}\n")
    print(table)
    report = {"command": command_line(), "settings": vars(args), "machine": machine, "rows": rows}
    write_results(report, table, args.json, args.markdown)
    if args.plot:
        write_plot(rows, args.plot, f"{model_description(args.model)}: {title}")
    return 0


def write_plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Mean patch cosine against the FLOP bound, one point per configuration (colour: landmark count; options in the
    label)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for landmarks in sorted({r["landmarks"] for r in rows}):
        points = [r for r in rows if r["landmarks"] == landmarks]
        ax.scatter([r["flop_bound"] for r in points], [r["patch_cosine"] for r in points], label=f"m={landmarks}")
        for r in points:
            options = ",".join(f"{v}" for v in _flat_options(r["options"]).values())
            label = r["schedule"] + (f" {options}" if options else "")
            ax.annotate(label, (r["flop_bound"], r["patch_cosine"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")  # fmt: skip
    ax.axhline(0.97, color="red", lw=0.8, ls="--", label="patch cosine 0.97")
    ax.axvline(1.0, color="gray", lw=0.8, label="exact attention (1.0x)")
    ax.set(xlabel="FLOP bound of the end-to-end speed-up", ylabel="mean patch cosine to exact")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.margins(x=0.15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _flat_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{key}.{k}" if isinstance(value, dict) else key: v
        for key, value in options.items()
        for k, v in (value.items() if isinstance(value, dict) else [(key, value)])
    }


if __name__ == "__main__":
    sys.exit(main())
