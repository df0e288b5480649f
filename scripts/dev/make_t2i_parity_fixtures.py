"""Record reference outputs of the official GEAR text-to-image AR code for `tests/test_t2i_parity.py`.

Builds a tiny official t2i `Transformer` (the official checkout's `models/llamagen_t2i.py`, dual-stream first
block(s)) with random weights, for each text-attention mode ("causal", "prefix"), saves it in the official
checkpoint layout (`{"ar", "ema", "args", "steps"}`) and records, in fp32 with TF32 off, for a batch of padded
captions of different lengths (one full, one short, one all-padding):

* full-sequence eval logits (hard and soft image input) and the `return_hidden_at` / `early_exit` taps,
* greedy (`sample_logits=False`) token grids from the official `models/generate_t2i.py` with CFG > 1 (with and
  without `cfg_interval`) and without CFG; the unconditional condition has an all-zero mask, as the encoding of ""
  by Qwen3,
* the official 2-D RoPE table with the text rows.

Usage (the official code imports `models.generate`, so its checkout root goes on sys.path):
    python scripts/dev/make_t2i_parity_fixtures.py --official-dir /path/to/GEAR --out tests/fixtures/parity/t2i
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

# Tiny model shared with tests/test_t2i_parity.py (which reads the sizes from the fixture).
TINY = {"dim": 64, "n_layer": 3, "n_head": 4, "vocab_size": 64, "grid_size": 4, "multiple_of": 64,
        "caption_dim": 24, "text_length": 8}
SEED = 4321
MODES = ("causal", "prefix")


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (incl. the zero-initialised head and the unit norms), O(1) logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_text.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def record_mode(llamagen_t2i, generate_t2i, mode: str, out: Path, gen: torch.Generator) -> None:
    t = TINY
    model_args = llamagen_t2i.ModelArgs(
        dim=t["dim"], n_layer=t["n_layer"], n_head=t["n_head"], vocab_size=t["vocab_size"],
        block_size=t["grid_size"] ** 2, multiple_of=t["multiple_of"], caption_dim=t["caption_dim"],
        cls_token_num=t["text_length"], text_attn=mode, token_dropout_p=0.0, resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
    )
    model = llamagen_t2i.Transformer(model_args)
    randomise(model, gen)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    T, L, batch = t["text_length"], t["grid_size"] ** 2, 3
    text = torch.randn(batch, T, t["caption_dim"], generator=gen)
    text_mask = torch.zeros(batch, T, dtype=torch.long)
    text_mask[0] = 1  # a caption filling the prefix
    text_mask[1, :3] = 1  # a short caption (right padding)
    # row 2: all padding (the official unconditional "" of Qwen3)
    tokens = torch.randint(0, t["vocab_size"], (batch, L), generator=gen)
    soft = torch.softmax(2.0 * torch.randn(batch, L - 1, t["vocab_size"], generator=gen), dim=-1)
    uncond = torch.randn(1, T, t["caption_dim"], generator=gen)

    with torch.no_grad():
        logits = model(tokens[:, :-1], text, text_mask=text_mask)
        logits_soft = model(soft, text, text_mask=text_mask)
        logits_tap, hidden_at_2 = model(tokens[:, :-1], text, text_mask=text_mask, return_hidden_at=2)
        _, hidden_early = model(tokens[:, :-1], text, text_mask=text_mask, return_hidden_at=2, early_exit=True)
        assert torch.equal(logits, logits_tap) and torch.equal(hidden_at_2, hidden_early)

    greedy = {}
    cond, cond_mask = text[:2], text_mask[:2]
    for name, kwargs in {
        "greedy_cfg3": {"cfg_scale": 3.0},
        "greedy_cfg2_interval3": {"cfg_scale": 2.0, "cfg_interval": 3},
        "greedy_nocfg": {"cfg_scale": 1.0},
    }.items():
        grid = generate_t2i.generate_t2i(
            model, cond, uncond.expand(2, -1, -1), L, cond_mask=cond_mask,
            uncond_mask=torch.zeros(2, T, dtype=torch.long), temperature=1.0, top_k=0, top_p=1.0,
            sample_logits=False, **kwargs)
        greedy[name] = grid.long().view(2, t["grid_size"], t["grid_size"])
        model.eval()  # the official train() override drops the KV caches set up by generate_t2i()

    rope = llamagen_t2i.precompute_freqs_cis_2d(t["grid_size"], t["dim"] // t["n_head"], 10000, T)
    out.mkdir(parents=True, exist_ok=True)
    args = {"text_attn": mode, "cls_token_num": T, "text_max_len": T, "image_size": t["grid_size"] * 16,
            "downsample_ratio": 16}
    live = dict(state)
    live["norm.weight"] = state["norm.weight"] + 0.5  # live vs EMA differ in one tensor (small fixture)
    torch.save({"ar": live, "ema": state, "args": args, "steps": 0}, out / f"t2i_{mode}_checkpoint.pt")
    torch.save(
        {
            "sizes": torch.tensor([t[k] for k in ("dim", "n_layer", "n_head", "vocab_size", "grid_size",
                                                  "caption_dim", "text_length")]),
            "n_double": torch.tensor(model.n_double_stream),
            "tokens": tokens, "text_embeds": text, "text_mask": text_mask, "soft_inputs": soft,
            "uncond_embeds": uncond, "logits": logits, "logits_soft": logits_soft, "hidden_at_2": hidden_at_2,
            "rope_table": rope, **greedy,
        },
        out / f"t2i_{mode}_reference.pt",
    )
    for name, grid in greedy.items():
        print(mode, name, grid.flatten(1).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", type=Path, required=True, help="checkout of the official GEAR repo")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/parity/t2i"))
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.filterwarnings("ignore", category=FutureWarning)  # official code uses the deprecated sdp_kernel
    sys.path.insert(0, str(args.official_dir))
    from models import generate_t2i, llamagen_t2i  # the official package (models/__init__ also loads tokenizers)

    gen = torch.Generator().manual_seed(SEED)
    for mode in MODES:
        record_mode(llamagen_t2i, generate_t2i, mode, args.out, gen)
    for f in sorted(args.out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
