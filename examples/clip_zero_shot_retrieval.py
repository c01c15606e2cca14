"""CLIP zero-shot classification and image-text retrieval with FNA in the vision tower (the text tower stays exact).

Both tasks go through the evaluation API (`hf_fna.evaluation.run_evaluation`): every batch runs with exact and with
FNA attention on the same weights, and each task prints a markdown table (metrics, samples/s, agreement).

    python examples/clip_zero_shot_retrieval.py --smoke      # offline: tiny random CLIP, the bundled photos
    python examples/clip_zero_shot_retrieval.py              # openai/clip-vit-base-patch32, CIFAR-10, Flickr 1k
    python examples/clip_zero_shot_retrieval.py --model openai/clip-vit-large-patch14 --image-size 448 \\
        --layers 12: --num-landmarks 64 --limit 1000 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

from hf_fna import FNAConfig, assets
from hf_fna.evaluation import EvalSettings, run_evaluation
from hf_fna.evaluation.tiny_models import build_tiny_clip, vocabulary

PROMPT = "a photo of a {}."


def bundled_datasets() -> tuple:
    """The scikit-image photos as a zero-shot set (each photo its own class, named after it) and as a retrieval set
    (two captions per photo)."""
    import datasets

    photos = assets.photos()
    names = [name.replace("_", " ") for name in photos["name"]]
    labels = datasets.ClassLabel(names=names)
    zero_shot = photos.add_column("label", list(range(len(names)))).cast_column("label", labels)
    captions = [[f"a photo of {name}.", f"the {name} picture."] for name in names]
    return zero_shot, photos.add_column("caption", captions), names, captions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="openai/clip-vit-base-patch32", help="CLIP or SigLIP: Hub id or folder")
    parser.add_argument("--tasks", default="zero-shot,retrieval", help="comma-separated: zero-shot, retrieval")
    parser.add_argument("--zero-shot-dataset", default="uoft-cs/cifar10", help="images with a ClassLabel column")
    parser.add_argument("--zero-shot-image-column", default="img")
    parser.add_argument("--retrieval-dataset", default="nlphuji/flickr_1k_test_image_text_retrieval")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=500, help="images per task")
    parser.add_argument("--image-size", type=int, default=448, help="FNA pays off with many tokens: go high")
    parser.add_argument("--layers", default="auto", help="FNAConfig.layers (auto: the second half)")
    parser.add_argument("--num-landmarks", type=int, default=64, help="FNAConfig.num_landmarks")
    parser.add_argument("--min-tokens", type=int, default=0, help="FNAConfig.min_tokens (0: FNA at every size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--smoke", action="store_true", help="tiny random CLIP and the bundled photos, offline")
    args = parser.parse_args(argv)
    fna_config = FNAConfig(layers=args.layers, num_landmarks=args.num_landmarks, min_tokens=args.min_tokens)
    datasets_by_task = {"zero-shot": args.zero_shot_dataset, "retrieval": args.retrieval_dataset}
    image_columns = {"zero-shot": args.zero_shot_image_column, "retrieval": None}

    model_label = args.model
    caveat = None
    with contextlib.ExitStack() as stack:
        if args.smoke:  # random weights: the metrics mean nothing, the agreement between the variants does
            zero_shot, retrieval, names, captions = bundled_datasets()
            words = vocabulary([PROMPT.format(name) for name in names] + [c for pair in captions for c in pair])
            args.model = build_tiny_clip(stack.enter_context(tempfile.TemporaryDirectory()), words)
            model_label = "tiny random CLIP"
            caveat = (
                "smoke run: a tiny model with random weights on 257-token images. Its metrics and its samples/s and "
                "speed-up measure nothing about FNA; only the agreement rows check that FNA ran and stayed close."
            )
            datasets_by_task = {"zero-shot": zero_shot, "retrieval": retrieval}
            image_columns = {"zero-shot": None, "retrieval": None}
            args.limit, args.image_size, args.batch_size = None, 64, 6
            fna_config = FNAConfig(layers="all", num_landmarks=16, min_tokens=0)

        results = {}
        for task in args.tasks.split(","):
            print(
                f"\n## {task}: {model_label}, {args.image_size} px, FNA layers {fna_config.layers}, "
                f"{fna_config.num_landmarks} landmarks\n"
            )
            if caveat:
                print(f"note: {caveat}\n")
            settings = EvalSettings(
                task=task,
                model=args.model,
                dataset=datasets_by_task[task],
                split=args.split,
                limit=args.limit,
                image_size=args.image_size,
                batch_size=args.batch_size,
                mixed_precision=args.mixed_precision,
                image_column=image_columns[task],
                prompt=PROMPT,
                fna_config=fna_config,
                show_progress=not args.smoke,
            )
            result = run_evaluation(settings)
            results[task] = {
                "metrics": result.metrics,
                "agreement": result.agreement,
                "speedup": result.throughput["speedup"],
                "num_samples": result.num_samples,
                "tokens_per_image": result.settings["tokens_per_image"],
                "notes": result.notes,
                "table": result.to_markdown(),
                "caveat": caveat,
            }
    return results


if __name__ == "__main__":
    main()
