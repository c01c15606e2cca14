"""`hf-fna push-config`: publish an `FNAConfig` as a Hub repo holding `fna_config.json` and a model card.

The repo holds settings, not weights: FNA is training-free and runs on the base model's own weights. The model card
says so, lists every setting, shows how to use them, and states whether speed/accuracy figures were measured (with
the command and machine that produced them) or the settings are only recommended.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..config import FNA_CONFIG_NAME, FNAConfig, field_help, read_json
from ..errors import InputError, first_line
from .arguments import add_fna_arguments, fna_overrides
from .outputs import check_output_set, write_files_atomically

MODEL_CARD_NAME = "README.md"
TAGS = ("fna", "vision", "nystrom-attention", "hf-fna")
_MEASURED_REQUIRED = ("command", "machine")


def _settings_rows(fna_config: FNAConfig) -> list[tuple[str, Any]]:
    rows = []
    for name, value in fna_config.to_dict().items():
        if isinstance(value, dict):
            rows += [(f"{name}.{sub}", sub_value) for sub, sub_value in value.items()]
        else:
            rows.append((name, value))
    return rows


def _front_matter(base_model: str | None) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="transformers", base_model=base_model, tags=list(TAGS))
    return f"---\n{data.to_yaml()}\n---\n"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def model_card(
    fna_config: FNAConfig,
    base_model: str | None,
    measured: dict[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
) -> str:
    """A Hub model card (`README.md`) for FNA settings of `base_model`.

    Args:
        fna_config: the settings; every field appears in the settings table.
        base_model: Hub id of the model the settings are for (the card's `base_model` metadata); None for a model
            that is not on the Hub (a local folder): the card then links to no model and names no base model.
        measured: figures measured with these settings, as `{"command": ..., "machine": ..., name: value, ...}`;
            without it the card carries a "Recommended settings, not measured" notice.
        repo_id: the repo the card will live in, for the usage snippet (default: a placeholder).
        model_name: how the card describes the model when `base_model` is None (e.g. "a DINOv2-small fine-tuned for
            saliency"); never used as a Hub id.

    Raises:
        ValueError: `measured` lacks its command or machine, or holds no figure.
    """
    repo = repo_id or "<this-repo>"
    if base_model is None:
        title = model_name or "a local model"
        described = (
            f"{title} (a local model: its Hub id is unknown, so this card names no base model; pass `--base-model` "
            "to `hf-fna calibrate` or `hf-fna push-config` to name one)"
        )
        model_ref = "<the model these settings were calibrated for>"
    else:
        title, described, model_ref = base_model, f"[`{base_model}`](https://huggingface.co/{base_model})", base_model
    lines = [
        _front_matter(base_model),
        f"# Fast Nyström Attention settings for {title}",
        "",
        f"Settings of Fast Nyström Attention (FNA) for {described}, for the "
        "`hf-fna` plugin of Transformers. FNA replaces exact attention in the chosen layers by a Nyström "
        "approximation built on landmark tokens picked by farthest point sampling; it needs no training. This "
        f"repository holds settings only (`{FNA_CONFIG_NAME}`): the weights are those of the base model.",
        "",
        "## Usage",
        "",
        "```python",
        'import hf_fna  # registers attn_implementation="fna"',
        "from transformers import AutoModel",
        "",
        f'model = AutoModel.from_pretrained("{model_ref}")',
        f'hf_fna.FNAConfig.from_pretrained("{repo}").apply(model)  # FNA with the settings below',
        "```",
        "",
        "A model repository whose `config.json` carries these settings (the `fna_config` entry that "
        "`model.save_pretrained` writes after `apply`) loads with them directly:",
        "",
        "```python",
        'model = AutoModel.from_pretrained("<model-repo-with-fna_config>", attn_implementation="fna")',
        "```",
        "",
        f'`AutoModel.from_pretrained("{model_ref}", attn_implementation="fna")` alone runs FNA with the default '
        "settings, not these.",
        "",
        "## Settings",
        "",
        "| setting | value | meaning |",
        "|---|---|---|",
    ]
    helps = field_help()
    lines += [
        f"| `{name}` | `{json.dumps(value)}` | {_cell(helps.get(name, ''))} |"
        for name, value in _settings_rows(fna_config)
    ]
    lines += ["", *_acting_section(fna_config), "", *_measured_section(base_model or model_ref, measured), ""]
    return "\n".join(lines)


def _acting_section(fna_config: FNAConfig) -> list[str]:
    """From which sequence length the settings act: below it every layer runs exact attention."""
    threshold = max(fna_config.min_tokens, fna_config.num_landmarks)
    return [
        "## When these settings act",
        "",
        f"FNA runs only on sequences of **{threshold} tokens or more** (`min_tokens={fna_config.min_tokens}`, "
        f"`num_landmarks={fna_config.num_landmarks}`); shorter sequences run exact attention in every layer, and "
        "`hf_fna` logs one warning per model saying so. A ViT with patch size p and k special tokens has "
        f"(S / p)^2 + k tokens at S x S px: at 224 px, patch 14 and one CLS token give 257 tokens, "
        f"{'too few for these settings' if threshold > 257 else 'enough for these settings'}. "
        "`hf_fna.explain(model)` lists, per layer, whether the last forward pass ran FNA or exact attention, and why.",
        "",
        "The default `min_tokens=512` comes from CPU measurements (DINOv2-small shapes, 2 cores: FNA breaks even at "
        "about 400 tokens). The break-even on CUDA has not been measured.",
    ]


def _measured_section(base_model: str, measured: dict[str, Any] | None) -> list[str]:
    if measured is None:
        return [
            "## Recommended settings, not measured",
            "",
            f"> **Recommended settings, not measured.** No speed or accuracy figure was measured with these settings "
            f"on `{base_model}`. Measure them on your own inputs and hardware (for example with "
            f"`hf-fna compare --model {base_model}`) before relying on them.",
        ]
    missing = [key for key in _MEASURED_REQUIRED if not str(measured.get(key) or "").strip()]
    figures = {k: v for k, v in measured.items() if k not in _MEASURED_REQUIRED}
    if missing or not figures:
        raise InputError(
            "measured figures need the command and machine that produced them and at least one figure; "
            f"missing: {', '.join(missing) or 'figures'}."
        )
    return [
        "## Measured",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {_cell(name)} | {_cell(value)} |" for name, value in figures.items()),
        "",
        f"Command: `{_cell(measured['command'])}`",
        "",
        f"Machine: {_cell(measured['machine'])}",
    ]


def write_config_folder(
    fna_config: FNAConfig,
    folder: str | os.PathLike,
    base_model: str,
    measured: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> list[str]:
    """Write `fna_config.json` and the model card `README.md` into `folder` (created if needed) as one set; return
    their paths. A failure (a target that is a folder, a full disk) leaves the folder's earlier files, never a new
    config beside an old card.

    Raises:
        OutputPathError: the folder or one of the two files cannot be written.
    """
    files = {
        FNA_CONFIG_NAME: fna_config.to_json_string(),
        MODEL_CARD_NAME: model_card(fna_config, base_model, measured, repo_id),
    }
    return write_files_atomically(os.fspath(folder), files)


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", required=True, help="Hub repo to create or update, e.g. user/dinov2-base-fna")
    parser.add_argument("--base-model", required=True, help="Hub id of the model the settings are for")
    parser.add_argument("--config", help="fna_config.json file, or a folder / Hub repo holding one")
    parser.add_argument("--measured", help="JSON file of measured figures with their 'command' and 'machine'")
    parser.add_argument("--dry-run", action="store_true", help="write the files to --out and upload nothing")
    parser.add_argument("--out", help="folder to write fna_config.json and README.md into (required with --dry-run)")
    parser.add_argument("--token", help="Hub token (default: the one huggingface_hub finds)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    add_fna_arguments(parser)  # instead of --config


def check_repo_id(option: str, value: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise InputError(f"{option} {value!r} is not a Hub repo id ({first_line(e)})") from e


def _load_fna_config(args: argparse.Namespace) -> FNAConfig:
    overrides = fna_overrides(args)
    if args.config is not None:
        if overrides:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in overrides)
            raise InputError(f"give either --config or the FNA settings options ({options}), not both")
        try:
            return FNAConfig.from_pretrained(args.config)
        except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise InputError(f"cannot read --config {args.config}: {first_line(e)}") from e
    return FNAConfig(**overrides)


def _load_measured(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        measured = read_json(path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read --measured {path}: {first_line(e)}") from e
    if not isinstance(measured, dict):
        raise InputError(f"--measured {path} must hold a JSON object")
    return measured


def run(args: argparse.Namespace) -> int:
    check_repo_id("--repo-id", args.repo_id)
    check_repo_id("--base-model", args.base_model)
    if args.dry_run and not args.out:
        raise InputError("--dry-run needs --out DIR, the folder to write the files into")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file; give a folder to write {FNA_CONFIG_NAME} and README.md into")
    if args.out:
        try:  # every target, before anything is read or written
            check_output_set(args.out, [FNA_CONFIG_NAME, MODEL_CARD_NAME])
        except OSError as e:
            raise InputError(f"cannot write to --out {args.out}: {e}") from None
    fna_config = _load_fna_config(args)
    measured = _load_measured(args.measured)
    try:
        card = model_card(fna_config, args.base_model, measured, repo_id=args.repo_id)
    except ValueError as e:
        raise InputError(f"--measured {args.measured}: {e}") from e
    if args.out:
        try:
            paths = write_config_folder(fna_config, args.out, args.base_model, measured, repo_id=args.repo_id)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot write to --out {args.out}: {first_line(e)}") from e
        for path in paths:
            print(f"wrote {path}")
    if args.dry_run:
        print(f"dry run: nothing uploaded to {args.repo_id}")
        return 0
    try:
        url = fna_config.push_to_hub(
            args.repo_id,
            commit_message="Upload FNA settings",
            model_card=card,
            token=args.token,
            private=True if args.private else None,
        )
    except Exception as e:  # network, authentication and Hub errors come in many types; all are reported the same
        raise InputError(f"upload to {args.repo_id} failed: {first_line(e, with_type=True)}") from e
    print(f"uploaded {FNA_CONFIG_NAME} and {MODEL_CARD_NAME} to {url}")
    return 0
