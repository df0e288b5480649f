"""Convert official GEAR checkpoints into `from_pretrained` directories.

    python scripts/convert_checkpoint.py tokenizer --quantizer vq --checkpoint gear-vq.pt --output gear-vq16 [--ema]
    python scripts/convert_checkpoint.py ar --checkpoint gear-ar.pt --output gear-ar-b --image-size 256 --ar-model LlamaGen-B
    python scripts/convert_checkpoint.py t2i --checkpoint gear-t2i.pt --output gear-t2i-1b --image-size 256 --ar-model LlamaGen-1B
    python scripts/convert_checkpoint.py t2i --checkpoint c2i_B_256.pt --output t2i-b-init --image-size 256 \
        --ar-model LlamaGen-B --init-text-stream-from-class-conditional --caption-dim 2048

Each subcommand is one `add_<name>_parser(subparsers)` function that registers its arguments and sets `func`.
"""

from __future__ import annotations

import argparse
import json
import sys

from gear_hf import GEARTokenizerConfig
from gear_hf.conversion import (
    load_ar_from_official_checkpoint,
    load_t2i_from_official_checkpoint,
    load_tokenizer_from_official_checkpoint,
)


def convert_tokenizer(args: argparse.Namespace) -> None:
    overrides = {"image_size": args.image_size} if args.image_size else {}
    if args.config:
        with open(args.config) as f:
            fields = {k: v for k, v in json.load(f).items() if k not in ("model_type", "transformers_version")}
        config = GEARTokenizerConfig(**{**fields, "quantizer": args.quantizer, **overrides})
    else:
        config = GEARTokenizerConfig.preset_for_quantizer(args.quantizer, **overrides)
    model, description = load_tokenizer_from_official_checkpoint(
        args.checkpoint, config, use_ema=args.ema, allow_pickle=args.allow_pickle
    )
    print(f"Weights used: {description}")
    model.save_pretrained(args.output)
    print(f"Wrote {config.quantizer.upper()} tokenizer ({model.num_parameters() / 1e6:.2f} M parameters) to {args.output}")


def add_tokenizer_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="VQ-16 / LFQ-16 / IBQ-16 tokenizer (GEAR, LlamaGen, Open-MAGVIT2 or IBQ checkpoint)",
        description="Convert an official tokenizer checkpoint; loading is strict and reports which weights were used.",
    )
    parser.add_argument("--quantizer", required=True, choices=["vq", "lfq", "ibq"])
    parser.add_argument("--checkpoint", required=True, help="official .pt / .ckpt / .safetensors file")
    parser.add_argument("--output", required=True, help="directory to write config.json + model.safetensors into")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights ('vq_ema') of a GEAR Stage-0/1 checkpoint")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle arbitrary Python objects in the file (only for files you trust)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="nominal image size stored in the config (256)")
    parser.add_argument(
        "--config",
        default=None,
        help="JSON file of GEARTokenizerConfig fields for a non-standard architecture (default: the released *-16)",
    )
    parser.set_defaults(func=convert_tokenizer)


def add_generator_arguments(parser: argparse.ArgumentParser, *, heads_required: bool) -> None:
    """The arguments the AR and t2i converters share (file, output, token grid, head count, EMA choice)."""
    parser.add_argument("--checkpoint", required=True, help="official .pt / .safetensors file")
    parser.add_argument("--output", required=True, help="directory to write config.json + model.safetensors into")
    parser.add_argument("--image-size", type=int, required=True, help="image size the AR was trained for (256)")
    parser.add_argument("--downsample", type=int, default=16, help="tokenizer stride (16 for all released tokenizers)")
    heads = parser.add_mutually_exclusive_group(required=heads_required)
    heads.add_argument("--ar-model", default=None, help="LlamaGen-S/B/L/XL/XXL/XXXL/1B (checked against the weights)")
    heads.add_argument("--num-heads", type=int, default=None, help="attention heads, for non-preset sizes")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights ('ema') of a GEAR checkpoint (default, as official inference); "
                        "--no-ema for 'ar'")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle arbitrary Python objects in the file (only for files you trust)")


def convert_generator(args: argparse.Namespace, load, **loader_kwargs):
    """Load an AR generator with the shared arguments of `add_generator_arguments` (plus `loader_kwargs`), save it
    to `--output` and report the weights used; returns the model."""
    model, description = load(args.checkpoint, image_size=args.image_size, downsample_factor=args.downsample,
                              preset=args.ar_model, num_attention_heads=args.num_heads, use_ema=args.ema,
                              allow_pickle=args.allow_pickle, **loader_kwargs)
    print(f"Weights used: {description}")
    model.save_pretrained(args.output)
    return model


def convert_ar(args: argparse.Namespace) -> None:
    model = convert_generator(args, load_ar_from_official_checkpoint)
    c = model.config
    print(
        f"Wrote AR generator ({model.num_parameters() / 1e6:.2f} M parameters: {c.num_hidden_layers} layers, "
        f"hidden {c.hidden_size}, {c.num_attention_heads} heads, {c.vocab_size} codes, {c.num_classes} classes, "
        f"{c.grid_size}x{c.grid_size} tokens) to {args.output}"
    )


def add_ar_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ar",
        help="class-conditional AR generator (GEAR 'ar'/'ema' or LlamaGen 'model' checkpoint)",
        description="Convert an official class-conditional AR checkpoint. Sizes are read from the weights; the "
        "token grid and the head count (via --ar-model or --num-heads) are not stored in released files.",
    )
    add_generator_arguments(parser, heads_required=True)
    parser.set_defaults(func=convert_ar)


def convert_t2i(args: argparse.Namespace) -> None:
    model = convert_generator(
        args, load_t2i_from_official_checkpoint, text_length=args.text_length, text_attention=args.text_attn,
        init_text_stream_from_class=args.init_text_stream_from_class_conditional, caption_dim=args.caption_dim,
    )
    c = model.config
    print(
        f"Wrote text-to-image AR generator ({model.num_parameters() / 1e6:.2f} M parameters: {c.num_hidden_layers} "
        f"layers ({c.num_double_stream_layers} dual-stream), hidden {c.hidden_size}, {c.num_attention_heads} heads, "
        f"caption_dim {c.caption_dim}, {c.text_length} text positions ({c.text_attention} attention), "
        f"{c.vocab_size} codes, {c.grid_size}x{c.grid_size} tokens) to {args.output}"
    )


def add_t2i_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "t2i",
        help="text-to-image AR generator (GEAR t2i 'ar'/'ema' checkpoint), or a new one from a class-conditional AR",
        description="Convert an official text-to-image AR checkpoint. Sizes (incl. caption_dim and the dual-stream "
        "blocks) are read from the weights; text length and attention mode from the checkpoint's saved args, else "
        "the flags, else the official 300 / causal; the head count from --ar-model / --num-heads (or the saved "
        "args' ar_model).",
    )
    add_generator_arguments(parser, heads_required=False)
    parser.add_argument("--text-length", type=int, default=None, help="text positions (official --text-max-len)")
    parser.add_argument("--text-attn", choices=["causal", "prefix"], default=None, help="text attention mode")
    parser.add_argument("--init-text-stream-from-class-conditional", action="store_true",
                        help="start a NEW text model from a class-conditional checkpoint: image stream loaded, text "
                        "stream copied from it (official init_text_stream_from_image), caption projection new")
    parser.add_argument("--caption-dim", type=int, default=None,
                        help="text-encoder hidden size, with --init-text-stream-from-class-conditional (Qwen3-1.7B: 2048)")
    parser.set_defaults(func=convert_t2i)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_tokenizer_parser(subparsers)
    add_ar_parser(subparsers)
    add_t2i_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "caption_dim", None) is not None and not args.init_text_stream_from_class_conditional:
        parser.error("--caption-dim applies only with --init-text-stream-from-class-conditional (the caption width "
                     "of a converted text-to-image checkpoint is read from its weights).")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:  # CheckpointMismatchError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
