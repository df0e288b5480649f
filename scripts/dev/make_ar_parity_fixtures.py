"""Record reference outputs of the official GEAR AR code for `tests/test_ar_parity.py`.

Builds a tiny official `Transformer` (from the official checkout's `models/llamagen.py`) with random weights,
saves it in the official checkpoint layout and records, in fp32 with TF32 off:

* full-sequence eval logits for fixed tokens/labels (hard and soft input),
* the `return_hidden_at` tap and the `early_exit` tap,
* greedy (`sample_logits=False`) token grids from the official `models/generate.py` with CFG > 1 (with and
  without `cfg_interval`) and without CFG,
* the official 2-D RoPE table.

Usage:
    python scripts/dev/make_ar_parity_fixtures.py --official-dir /work/official/gear --out tests/fixtures/parity
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

# Tiny model shared with tests/test_ar_parity.py (which reads the sizes from the fixture).
TINY = {"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "num_classes": 10, "grid_size": 4,
        "multiple_of": 64}
SEED = 1234


def import_official(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (incl. the zero-initialised head and the unit norms), O(1) logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", type=Path, required=True, help="checkout of the official GEAR repo")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/parity"))
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.filterwarnings("ignore", category=FutureWarning)  # official code uses the deprecated sdp_kernel
    llamagen = import_official(args.official_dir / "models" / "llamagen.py", "official_llamagen")
    generate = import_official(args.official_dir / "models" / "generate.py", "official_generate")

    gen = torch.Generator().manual_seed(SEED)
    model_args = llamagen.ModelArgs(
        dim=TINY["dim"], n_layer=TINY["n_layer"], n_head=TINY["n_head"], vocab_size=TINY["vocab_size"],
        num_classes=TINY["num_classes"], block_size=TINY["grid_size"] ** 2, multiple_of=TINY["multiple_of"],
        class_dropout_prob=0.1,
    )
    model = llamagen.Transformer(model_args)
    randomise(model, gen)
    model.eval()
    ema_state = {k: v.clone() for k, v in model.state_dict().items()}
    # The live weights differ from the EMA ones only in the final norm (keeps the fixture small: shared storage).
    live_state = dict(ema_state)
    live_state["norm.weight"] = ema_state["norm.weight"] + 0.5

    num_tokens = TINY["grid_size"] ** 2
    batch = 3
    tokens = torch.randint(0, TINY["vocab_size"], (batch, num_tokens), generator=gen)
    labels = torch.tensor([2, 7, TINY["num_classes"]])  # last row: the null class
    soft = torch.softmax(2.0 * torch.randn(batch, num_tokens - 1, TINY["vocab_size"], generator=gen), dim=-1)

    with torch.no_grad():
        logits = model(tokens[:, :-1], labels)
        logits_soft = model(soft, labels)
        logits_tap, hidden_at_1 = model(tokens[:, :-1], labels, return_hidden_at=1)
        _, hidden_early = model(tokens[:, :-1], labels, return_hidden_at=1, early_exit=True)
        assert torch.equal(logits, logits_tap) and torch.equal(hidden_at_1, hidden_early)

    greedy = {}
    cond = labels[:2]
    for name, kwargs in {
        "greedy_cfg4": {"cfg_scale": 4.0},
        "greedy_cfg2_interval3": {"cfg_scale": 2.0, "cfg_interval": 3},
        "greedy_nocfg": {"cfg_scale": 1.0},
    }.items():
        out = generate.generate(model, cond, num_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                sample_logits=False, **kwargs)
        greedy[name] = out.long().view(len(cond), TINY["grid_size"], TINY["grid_size"])
        model.eval()  # the official train() override drops the KV caches set up by generate()

    rope = llamagen.precompute_freqs_cis_2d(TINY["grid_size"], TINY["dim"] // TINY["n_head"], 10000, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"ar": live_state, "ema": ema_state, "steps": 0}, args.out / "ar_checkpoint.pt")
    torch.save(
        {
            "sizes": torch.tensor([TINY[k] for k in ("dim", "n_layer", "n_head", "vocab_size", "num_classes",
                                                     "grid_size")]),
            "tokens": tokens, "labels": labels, "soft_inputs": soft,
            "logits": logits, "logits_soft": logits_soft, "hidden_at_1": hidden_at_1,
            "cond_labels": cond, "rope_table": rope, **greedy,
        },
        args.out / "ar_reference.pt",
    )
    for f in ("ar_checkpoint.pt", "ar_reference.pt"):
        print(f"{args.out / f}: {(args.out / f).stat().st_size / 1024:.0f} KiB")
    for name, grid in greedy.items():
        print(name, grid.flatten(1).tolist())


if __name__ == "__main__":
    main()
