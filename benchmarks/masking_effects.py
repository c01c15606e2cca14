"""What the masking interventions do inside a real model with massive tokens, with exact attention.

For each intervention of `hf_fna.MaskingConfig` (none, mask, sink, sink_keep_self; detection and layers at their
defaults) the same images run through the model with `output_attentions=True`. Per intervention, against the plain
model (intervention "none"):

- the attention the flagged tokens receive (their summed share of each query's attention, mean over queries, heads
  and images) in the layers from the intervention on;
- new massive tokens: tokens not flagged whose norm exceeds 10x the median token norm, per image, in the hidden
  states after the intervention starts (does suppressing one group let another grow, as the paper's study of
  massive and artifact tokens describes?), and the largest max/median token norm there;
- the share of attention that the same number of most-attended unflagged tokens receive (new sinks);
- the cosine of the image embedding (CLIP's `image_embeds`, else the pooler output) to the plain model's.

The attention matrices are quadratic in the tokens: meant for 224-448 px. Nothing is timed.

    python benchmarks/masking_effects.py --resolution 448 --split report --textiles 30 \
        --json benchmarks/results/clip/masking_effects_448.json \
        --markdown benchmarks/results/clip/masking_effects_448.md
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from common import command_line, load_saved_model, machine_info, write_results
from tqdm.auto import tqdm

INTERVENTIONS = ("none", "mask", "sink", "sink_keep_self")
MASSIVE_RATIO = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf_fna:clip-b16")
    parser.add_argument("--resolution", type=int, default=448)
    parser.add_argument("--split", choices=("tune", "report", "all"), default="report")
    parser.add_argument("--textiles", type=int, default=0, help="also this many textile images (conformal-clip-data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)

    import transformers
    from transformers.utils import logging as hf_logging

    from hf_fna import FNAConfig, MaskingConfig, last_flagged_tokens
    from hf_fna.assets import photos, textiles
    from hf_fna.integration.towers import interpolation_kwargs, special_tokens
    from hf_fna.tools.measure import model_description, model_folder
    from hf_fna.tools.pipeline import ImagePreprocessing

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = model_folder(args.model)
    config = transformers.AutoConfig.from_pretrained(path)
    preprocessing = ImagePreprocessing.from_pretrained(path)
    images = list(photos(None if args.split == "all" else args.split)["image"])
    if args.textiles:
        test = textiles("test")
        step = max(len(test) // args.textiles, 1)
        images += list(test.select(range(0, step * args.textiles, step))["image"])
    special = special_tokens(config).leading

    models = {}
    for intervention in INTERVENTIONS:
        model = load_saved_model(path, "fna")
        models[intervention] = FNAConfig(layers="none", masking=MaskingConfig(intervention=intervention)).apply(model)
    start = FNAConfig(masking=MaskingConfig(intervention="mask")).resolve(config.num_hidden_layers).from_layer
    detector = FNAConfig(layers="none", masking=MaskingConfig(intervention="mask"))  # flags of the plain pass
    flag_model = detector.apply(load_saved_model(path, "fna"))

    totals: dict[str, dict[str, list[float]]] = {
        name: {"flagged_share": [], "new_massive": [], "max_ratio": [], "top_unflagged_share": [], "embed_cosine": []}
        for name in INTERVENTIONS
    }
    for image in tqdm(images, desc=f"{args.resolution} px"):
        pixels = preprocessing.tensor(image, args.resolution)[None]
        kwargs = interpolation_kwargs(flag_model)
        with torch.inference_mode():
            flag_model(pixel_values=pixels, **kwargs)
            flags = last_flagged_tokens(flag_model)[0]
            outputs = {
                name: model(pixel_values=pixels, output_attentions=True, output_hidden_states=True, **kwargs)
                for name, model in models.items()
            }
        count = max(int(flags.sum()), 1)
        reference = _embedding(outputs["none"])
        for name, output in outputs.items():
            attentions = output.attentions[start:]  # [1, H, N, N] per layer from the intervention on
            received = torch.stack([a[0].float().mean(dim=0)[:, flags].sum(dim=-1).mean() for a in attentions])
            incoming = torch.stack([a[0].float().mean(dim=(0, 1)) for a in attentions])  # [layers, N]
            incoming[:, flags] = -1.0
            incoming[:, :special] = -1.0
            top = incoming.topk(count, dim=-1).values.clamp_min(0).sum(dim=-1)
            states = output.hidden_states[start + 1 :]
            new, ratios = [], []
            for hidden in states:
                norms = hidden[0].float().norm(dim=-1)
                median = norms[special:].median()
                grown = (norms > MASSIVE_RATIO * median) & ~flags
                grown[:special] = False
                new.append(int(grown.sum()))
                ratios.append(float(norms[special:][~flags[special:]].max() / median))
            cosine = torch.nn.functional.cosine_similarity(_embedding(output), reference, dim=-1)
            for key, value in (
                ("flagged_share", float(received.mean())),
                ("new_massive", max(new)),
                ("max_ratio", max(ratios)),
                ("top_unflagged_share", float(top.mean())),
                ("embed_cosine", float(cosine.mean())),
            ):
                totals[name][key].append(value)

    rows = [
        {"intervention": name, **{key: sum(v) / len(v) for key, v in values.items()}, "images": len(images)}
        for name, values in totals.items()
    ]
    lines = [
        f"| intervention | flagged tokens' attention share, layers {start}-{config.num_hidden_layers - 1} "
        "| new massive tokens per image | largest unflagged max/median norm "
        "| attention share of as many top unflagged tokens | image embedding cosine to none |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['intervention']} | {r['flagged_share']:.1%} | {r['new_massive']:.1f} | {r['max_ratio']:.1f} "
            f"| {r['top_unflagged_share']:.1%} | {r['embed_cosine']:.4f} |"
        )
    table = "\n".join(lines)
    data = f"{args.split} photos" + (f" and {args.textiles} textile test images" if args.textiles else "")
    caption = f"{model_description(args.model)}, {args.resolution} px, {data}; masking from layer {start} on"
    print(caption + "\n")
    print(table)
    report = {"command": command_line(), "settings": vars(args), "machine": machine_info("cpu"), "rows": rows}
    write_results(report, f"{caption}\n\n{table}", args.json, args.markdown)
    return 0


def _embedding(output: Any) -> torch.Tensor:
    embeds = getattr(output, "image_embeds", None)
    return (embeds if embeds is not None else output.pooler_output).float()


if __name__ == "__main__":
    sys.exit(main())
