"""Mean intersection over union (IoU) for semantic segmentation, accumulated over the whole dataset."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Mean IoU for semantic segmentation. Intersections and unions of each class are summed over all images, then "
    "IoU = intersection / union per class; mean_iou averages it over the classes that occur in the predictions or "
    "the references (classes with an empty union are left out). Pixels whose reference is `ignore_index` do not count."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of 2-D int arrays): predicted class per pixel.
    references (list of 2-D int arrays): reference class per pixel, same shapes.
    num_labels (int): number of classes; labels lie in [0, num_labels).
    ignore_index (int, optional): reference value of pixels to leave out (e.g. 255).
Returns:
    mean_iou (float), mean_accuracy (float: mean over classes of per-class pixel recall), overall_accuracy (float),
    per_category_iou (list of float, NaN for classes absent from predictions and references).
Example:
    >>> metric = evaluate.load("path/to/hf_fna/metrics/mean_iou")
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 0], [1, 1]]], num_labels=2)["mean_iou"]
    0.5833333333333333
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index=None) -> dict:
        if len(predictions) == 0:
            raise ValueError("mean_iou needs at least one image.")
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # [reference, prediction]
        for prediction, reference in zip(predictions, references, strict=True):
            prediction, reference = np.asarray(prediction).ravel(), np.asarray(reference).ravel()
            if prediction.shape != reference.shape:
                raise ValueError(f"mean_iou: prediction has {prediction.size} pixels, its reference {reference.size}.")
            keep = reference != ignore_index if ignore_index is not None else slice(None)
            prediction, reference = prediction[keep], reference[keep]
            if prediction.size and (
                min(prediction.min(), reference.min()) < 0 or max(prediction.max(), reference.max()) >= num_labels
            ):
                raise ValueError(f"mean_iou: labels must lie in [0, {num_labels}) (or equal ignore_index).")
            confusion += np.bincount(reference * num_labels + prediction, minlength=num_labels**2).reshape(
                num_labels, num_labels
            )
        intersection = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - intersection
        reference_area = confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            recall = np.where(reference_area > 0, intersection / reference_area, np.nan)
        return {
            "mean_iou": float(np.nanmean(iou)),
            "mean_accuracy": float(np.nanmean(recall)),
            "overall_accuracy": float(intersection.sum() / max(confusion.sum(), 1)),
            "per_category_iou": iou.tolist(),
        }
