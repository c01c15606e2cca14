"""Massive tokens of a real model, and how well each detector of `hf_fna.MaskingConfig` finds them.

Per resolution and image, one exact forward pass records every hidden state and the attention probabilities of the
detection layer (averaged over heads). The ground truth is the definition the detectors are measured against:
patch tokens entering the detection layer whose L2 norm exceeds 10x the median token norm. Reported:

- the norm profile: max/median token norm of every hidden state (mean over images);
- the massive tokens per image and the attention they receive at the detection layer: their summed share of each
  query's attention (mean over queries and images), and each token's incoming attention as a multiple of the uniform
  share 1/N, for the massive tokens and for the tail of tokens at 5-10x the median;
- precision and recall of `norm_ratio` (`detect_high_norm_tokens`), `norm_gap` (`detect_massive_tokens`) and
  `attention` (`detect_attention_sinks`) at their default settings, against the ground truth, pooled over images;
- how farthest point sampling sees them: the mean cosine between the head-mean queries (the FPS features) of two
  massive tokens, and of two other patch tokens, and how many massive tokens 64 landmarks chosen at that layer
  include (FPS from the special tokens, from the first token, and random).

Nothing is timed, so it can run on a busy machine.

    python benchmarks/massive_tokens.py --model hf_fna:clip-b16 --resolutions 224 448 896 --split report \
        --json benchmarks/results/clip/massive_tokens_report.json \
        --markdown benchmarks/results/clip/massive_tokens_report.md
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from common import command_line, machine_info, write_results
from tqdm.auto import tqdm

from hf_fna import MaskingConfig
from hf_fna.ops.landmarks import select_landmarks
from hf_fna.ops.sinks import (
    attention_probabilities,
    detect_attention_sinks,
    detect_high_norm_tokens,
    detect_massive_tokens,
)

MASSIVE_RATIO = 10.0
LANDMARKS = 64
TAIL_RATIO = 5.0
RECORD_ATTENTION = "hf_fna_bench_record"  # SDPA that also records the head-averaged probabilities of one module
_recorded: dict[str, Any] = {}


def _recording_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if module is _recorded.get("module"):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        _recorded["probabilities"] = attention_probabilities(query, key, scale)
        _recorded["features"] = query.mean(dim=1).float()  # what FPS measures distances on (sampling_features="q")
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def precision_recall(flags: list[torch.Tensor], truth: list[torch.Tensor]) -> dict[str, float]:
    hits = sum(int((f & t).sum()) for f, t in zip(flags, truth, strict=True))
    flagged = sum(int(f.sum()) for f in flags)
    true = sum(int(t.sum()) for t in truth)
    return {
        "precision": hits / flagged if flagged else float("nan"),
        "recall": hits / true if true else float("nan"),
        "flagged": flagged,
        "true": true,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_fna:clip-b16", help="hf_fna:clip-b16, hf_fna:dinov2-small or a folder")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--split", choices=("tune", "report", "all"), default="report")
    parser.add_argument("--textiles", type=int, default=0, help="also this many textile images (conformal-clip-data)")
    parser.add_argument("--detect-layer", type=int, help="default: MaskingConfig's default for the model's depth")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)

    from transformers import AttentionInterface, AutoModel
    from transformers.utils import logging as hf_logging

    from hf_fna import FNAConfig
    from hf_fna.assets import photos, textiles
    from hf_fna.integration.towers import attention_layers, interpolation_kwargs, special_tokens
    from hf_fna.tools.measure import model_description, model_folder
    from hf_fna.tools.pipeline import ImagePreprocessing

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    AttentionInterface.register(RECORD_ATTENTION, _recording_attention)
    path = model_folder(args.model)
    model = AutoModel.from_pretrained(path, attn_implementation=RECORD_ATTENTION).eval()
    preprocessing = ImagePreprocessing.from_pretrained(path)
    num_layers = model.config.num_hidden_layers
    masking = MaskingConfig(intervention="mask", detect_layer=args.detect_layer)
    layer = FNAConfig(masking=masking).resolve(num_layers).detect_layer
    _recorded["module"] = attention_layers(model)[layer]
    special = special_tokens(model.config).leading
    images = list(photos(None if args.split == "all" else args.split)["image"])
    if args.textiles:
        test = textiles("test")
        step = max(len(test) // args.textiles, 1)
        images += list(test.select(range(0, step * args.textiles, step))["image"])

    rows = []
    for size in args.resolutions:
        ratios, truth, flags = [], [], {"norm_ratio": [], "norm_gap": [], "attention": []}
        share, incoming_massive, incoming_tail = [], [], []
        similarity: dict[str, list[float]] = {"massive": [], "other": []}
        picked: dict[str, list[int]] = {"fps (special)": [], "fps (first)": [], "random": []}
        for image in tqdm(images, desc=f"{size} px", leave=False):
            pixels = preprocessing.tensor(image, size)[None]
            with torch.inference_mode():
                states = model(pixel_values=pixels, output_hidden_states=True, **interpolation_kwargs(model))
            states = states.hidden_states
            norms = [h[0, special:].norm(dim=-1) for h in states]
            ratios.append([float(n.max() / n.median()) for n in norms])
            hidden = states[layer]
            norm = hidden[0].norm(dim=-1)
            relative = norm / norm[special:].median()
            true = relative > MASSIVE_RATIO
            true[:special] = False
            truth.append(true)
            flags["norm_ratio"].append(detect_high_norm_tokens(hidden, num_special_tokens=special)[0])
            flags["norm_gap"].append(detect_massive_tokens(hidden, masking.min_gap, None, special)[0])
            probabilities = _recorded["probabilities"]
            flags["attention"].append(detect_attention_sinks(probabilities, masking.std_threshold, None, special)[0])
            tokens = hidden.shape[1]
            share.append(float(probabilities[0][:, true].sum(dim=-1).mean()))
            received = probabilities[0].mean(dim=0) * tokens  # incoming attention, in multiples of 1/N
            tail = (relative > TAIL_RATIO) & ~true
            tail[:special] = False
            incoming_massive += received[true].tolist()
            incoming_tail += received[tail].tolist()
            features = torch.nn.functional.normalize(_recorded["features"][0], dim=-1)
            others = ~true
            others[:special] = False
            for name, members in (("massive", true), ("other", others)):
                chosen = features[members][:256]  # a bounded sample of pairs
                if len(chosen) > 1:
                    pairs = chosen @ chosen.T
                    similarity[name].append(float(pairs[~torch.eye(len(chosen), dtype=torch.bool)].mean()))
            for name, (method, start) in {
                "fps (special)": ("fps", "special"), "fps (first)": ("fps", "first"), "random": ("random", "special")
            }.items():  # fmt: skip
                landmarks = select_landmarks(
                    _recorded["features"], min(LANDMARKS, tokens), method, special, start=start
                )
                picked[name].append(int(true[landmarks[0]].sum()))
        counts = [int(t.sum()) for t in truth]
        row = {
            "resolution": size,
            "tokens": tokens,
            "images": len(images),
            "detect_layer": layer,
            "max_over_median_per_state": [sum(r[i] for r in ratios) / len(ratios) for i in range(len(ratios[0]))],
            "massive_per_image": {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts)},
            "attention_share_of_massive": {"mean": sum(share) / len(share), "min": min(share), "max": max(share)},
            "incoming_over_uniform_massive": _median(incoming_massive),
            "incoming_over_uniform_tail": _median(incoming_tail),
            "tail_tokens": len(incoming_tail),
            "detectors": {name: precision_recall(found, truth) for name, found in flags.items()},
            "query_cosine": {name: sum(v) / len(v) if v else None for name, v in similarity.items()},
            "massive_among_landmarks": {name: sum(v) for name, v in picked.items()},
            "landmarks": min(LANDMARKS, tokens),
        }
        rows.append(row)
        print(f"{size} px: {row['massive_per_image']} massive tokens per image; {row['detectors']}", file=sys.stderr)

    table = markdown(rows)
    data = f"{args.split} photos" + (f" and {args.textiles} textile test images" if args.textiles else "")
    print(f"{model_description(args.model)}, {data}, detection layer {layer}\n")
    print(table)
    report = {"command": command_line(), "settings": vars(args), "machine": machine_info("cpu"), "rows": rows}
    write_results(report, table, args.json, args.markdown)
    return 0


def _median(values: list[float]) -> float | None:
    return float(torch.tensor(values).median()) if values else None


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| px | tokens | massive per image (range) | their attention share | incoming / uniform: massive | "
        "5-10x tail | norm_ratio P / R | norm_gap P / R | attention P / R |",
        "|---:|---:|---|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        count, share = r["massive_per_image"], r["attention_share_of_massive"]
        detectors = [r["detectors"][name] for name in ("norm_ratio", "norm_gap", "attention")]
        tail = "-" if r["incoming_over_uniform_tail"] is None else f"{r['incoming_over_uniform_tail']:.1f}x"
        massive = "-" if r["incoming_over_uniform_massive"] is None else f"{r['incoming_over_uniform_massive']:.1f}x"
        lines.append(
            f"| {r['resolution']} | {r['tokens']} | {count['mean']:.1f} ({count['min']}-{count['max']}) "
            f"| {share['mean']:.0%} ({share['min']:.0%}-{share['max']:.0%}) | {massive} | {tail} | "
            + " | ".join(f"{d['precision']:.2f} / {d['recall']:.2f}" for d in detectors)
            + " |"
        )
    lines += [
        "",
        f"FPS features (head-mean queries) at the detection layer; {rows[0]['landmarks']} landmarks chosen there:",
        "",
    ]
    names = list(rows[0]["massive_among_landmarks"])
    lines += [
        "| px | query cosine, two massive tokens | two other patches | massive tokens | "
        + " | ".join(f"picked by {n}" for n in names)
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        cosine = r["query_cosine"]
        massive = "-" if cosine["massive"] is None else f"{cosine['massive']:.2f}"
        total = round(r["massive_per_image"]["mean"] * r["images"])
        lines.append(
            f"| {r['resolution']} | {massive} | {cosine['other']:.2f} | {total} | "
            + " | ".join(str(r["massive_among_landmarks"][n]) for n in names)
            + " |"
        )
    lines += ["", "max/median token norm per hidden state (state k enters layer k):", ""]
    states = len(rows[0]["max_over_median_per_state"])
    lines += ["| px | " + " | ".join(str(k) for k in range(states)) + " |", "|---:|" + "---:|" * states]
    for r in rows:
        lines.append(f"| {r['resolution']} | " + " | ".join(f"{v:.1f}" for v in r["max_over_median_per_state"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
