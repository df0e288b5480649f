"""Write the tokenizer parity fixtures from the official GEAR code (developer tool, needs the official checkout).

For each quantizer (vq, lfq, ibq) this builds a tiny official model, randomises every parameter with a fixed seed,
saves it in one of the official checkpoint layouts, and records the official outputs on fixed inputs:

    <out>/<quantizer>/checkpoint.pt        official layout (vq: GEAR {'vq','vq_ema'}, lfq: Lightning with
                                           model_ema shadows, ibq: bare DDP 'module.'-prefixed state dict)
    <out>/<quantizer>/expected.safetensors inputs and official outputs (eval and training mode)
    <out>/<quantizer>/case.json            the matching GEARTokenizerConfig kwargs and how to load the file

`tests/test_tokenizer_parity.py` replays them through gear_hf's conversion path, so CI needs no official code.

    python scripts/dev/make_tokenizer_parity_fixtures.py --official-dir /work/official/gear --out tests/fixtures/parity
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

SEED = 1234
BATCH, IMAGE_SIZE = 2, 16  # 8x8 tokens per image
ENTROPY_LOSS_RATIO = 0.05  # what every GEAR trainer sets

# Tiny architectures: two resolution levels of width 32 (the GroupNorm minimum), one residual block per level.
CASES = {
    "vq": {
        "layout": "gear",
        "use_ema": True,
        "config": {"quantizer": "vq", "codebook_size": 64, "codebook_embed_dim": 8, "base_channels": 32,
                   "channel_multipliers": [1, 1], "num_res_blocks": 1, "z_channels": 8, "attention_levels": [1],
                   "image_size": IMAGE_SIZE},
    },
    "lfq": {
        "layout": "lightning",
        "use_ema": False,
        "config": {"quantizer": "lfq", "codebook_size": 64, "base_channels": 32, "channel_multipliers": [1, 1],
                   "num_res_blocks": 1, "attention_levels": [], "image_size": IMAGE_SIZE},
    },
    "ibq": {
        "layout": "bare_ddp",
        "use_ema": False,
        "config": {"quantizer": "ibq", "codebook_size": 64, "codebook_embed_dim": 16, "base_channels": 32,
                   "channel_multipliers": [1, 1], "num_res_blocks": 1, "z_channels": 16, "attention_levels": [1],
                   "image_size": IMAGE_SIZE},
    },
}


def build_official(quantizer: str):
    """Tiny official model of one family (constructed from the official classes, not copied)."""
    if quantizer == "vq":
        from models.vq_model import Decoder, Encoder, ModelArgs, VQModel

        model = VQModel(ModelArgs(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 1],
                                  decoder_ch_mult=[1, 1], z_channels=8, entropy_loss_ratio=ENTROPY_LOSS_RATIO))
        # VQModel hard-codes ch=128 / num_res_blocks=2; swap in the small encoder/decoder.
        model.encoder = Encoder(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8)
        model.decoder = Decoder(z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1)
        return model
    if quantizer == "lfq":
        from models.lfq_model import LFQModel, LFQModelArgs

        return LFQModel(LFQModelArgs(codebook_size=64, codebook_embed_dim=6, z_channels=6, ch=32, ch_mult=[1, 1],
                                     num_res_blocks=1, resolution=IMAGE_SIZE, entropy_loss_ratio=ENTROPY_LOSS_RATIO))
    from models.ibq_model import IBQModel, IBQModelArgs

    return IBQModel(IBQModelArgs(codebook_size=64, codebook_embed_dim=16, z_channels=16, ch=32, ch_mult=[1, 1],
                                 num_res_blocks=1, attn_resolutions=[IMAGE_SIZE // 2], resolution=IMAGE_SIZE,
                                 entropy_loss_ratio=ENTROPY_LOSS_RATIO))


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a non-trivial random value (GroupNorm affines and codebooks included)."""
    for module in model.modules():
        if isinstance(module, nn.GroupNorm) and module.affine:
            module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (1.5 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def perturbed(state: dict, keys: list[str], generator: torch.Generator) -> dict:
    """A copy of `state` that shares every tensor except `keys`, which get a random perturbation.

    Shared tensors are stored once by torch.save, keeping the two-copy (live + EMA) fixtures small.
    """
    out = dict(state)
    for key in keys:
        out[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=generator)
    return out


def save_in_layout(quantizer: str, state: dict, path: str, generator: torch.Generator) -> dict:
    """Save `state` in the case's official layout; return the state dict the official loader would use."""
    layout = CASES[quantizer]["layout"]
    if layout == "gear":
        # Stage-0/1 checkpoint: live + EMA tokenizer weights; the EMA copy differs in the codebook and output
        # convs. The live copy carries LlamaGen's `quantize.codebook_used` buffer that loaders must ignore.
        differing = ["quantize.embedding.weight", "decoder.conv_out.weight", "quant_conv.weight"]
        ema = state
        live = perturbed(state, differing, generator)
        # (LlamaGen's buffer has 65536 entries; only its name matters here, so keep the fixture small.)
        live["quantize.codebook_used"] = torch.zeros(64, dtype=torch.long)
        torch.save({"vq": live, "vq_ema": ema, "steps": 1000, "stage": 0, "args": {"vq_model": "VQ-16"}}, path)
        return ema
    if layout == "lightning":
        # Open-MAGVIT2 release: live params + `model_ema.<dotless name>` shadows (preferred by the loader).
        differing = ["encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.adaptive.0.gamma.weight"]
        ema = state
        live = perturbed(state, differing, generator)
        lightning = dict(live)
        lightning.update({"model_ema." + k.replace(".", ""): v for k, v in ema.items()})
        lightning["model_ema.decay"] = torch.tensor(0.999)
        lightning["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
        lightning["loss.logvar"] = torch.zeros(())
        torch.save({"state_dict": lightning, "global_step": 1000, "epoch": 3}, path)
        return ema
    # Bare state dict saved from a DDP-wrapped model.
    torch.save({"module." + k: v for k, v in state.items()}, path)
    return state


def official_outputs(model, pixel_values: torch.Tensor, decode_indices: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        recon, quant, _, info, distance = model(pixel_values, return_distance=True)
        latent_shape = (decode_indices.shape[0], quant.shape[1], *decode_indices.shape[1:])
        decoded = model.decode_code(decode_indices.reshape(-1), shape=latent_shape)
    batch, _, height, width = quant.shape
    out = {
        "pixel_values": pixel_values,
        "indices": info[2].reshape(batch, height, width),
        "distance": distance,
        "quantized": quant,
        "reconstruction": recon,
        "decode_indices": decode_indices,
        "decoded": decoded,
    }
    model.train()
    with torch.no_grad():
        _, _, (vq_loss, commit_loss, entropy, _), _, _ = model(pixel_values, return_distance=True)
    zero = torch.zeros(())
    out.update({
        "train_codebook_loss": zero if vq_loss is None else vq_loss,
        "train_commitment_loss": zero if commit_loss is None else commit_loss,
        "train_entropy_loss": entropy[0],
        "train_sample_entropy": entropy[1],
        "train_avg_entropy": entropy[2],
    })
    model.eval()
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}


def make_case(quantizer: str, out_dir: str) -> None:
    from src.utils import load_pretrained_tokenizer_state_dict

    generator = torch.Generator().manual_seed(SEED + list(CASES).index(quantizer))
    torch.manual_seed(SEED)
    model = build_official(quantizer)
    randomize_(model, generator)
    case_dir = os.path.join(out_dir, quantizer)
    os.makedirs(case_dir, exist_ok=True)
    ckpt_path = os.path.join(case_dir, "checkpoint.pt")
    expected_state = save_in_layout(quantizer, model.state_dict(), ckpt_path, generator)

    # Reload through the official loader where it handles the layout, so the expectations reflect its choice.
    if CASES[quantizer]["layout"] != "bare_ddp":
        state = load_pretrained_tokenizer_state_dict(ckpt_path, use_ema=CASES[quantizer]["use_ema"])
        assert all(torch.equal(state[k], expected_state[k]) for k in expected_state), "official loader disagrees"
    official = build_official(quantizer)
    missing, unexpected = official.load_state_dict(expected_state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    pixel_values = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    latent = IMAGE_SIZE // 2
    decode_indices = torch.randint(0, CASES[quantizer]["config"]["codebook_size"], (BATCH, latent, latent),
                                   generator=generator)
    save_file(official_outputs(official, pixel_values, decode_indices), os.path.join(case_dir, "expected.safetensors"))
    case = {k: v for k, v in CASES[quantizer].items()}
    case["checkpoint"] = "checkpoint.pt"
    case["provenance"] = "official GEAR models/*.py outputs, fp32, TF32 off, CPU (scripts/dev/make_tokenizer_parity_fixtures.py)"
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(case, f, indent=2)
    sizes = sum(os.path.getsize(os.path.join(case_dir, name)) for name in os.listdir(case_dir))
    print(f"{quantizer}: {sum(v.numel() for v in expected_state.values() if v.is_floating_point())} params, "
          f"{sizes / 1e6:.2f} MB in {case_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, help="checkout of the official GEAR repository")
    parser.add_argument("--out", default="tests/fixtures/parity")
    parser.add_argument("--quantizers", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out_dir = os.path.abspath(args.out)
    sys.path.insert(0, os.path.abspath(args.official_dir))
    os.chdir(args.official_dir)  # the official modules import each other as top-level packages
    for quantizer in args.quantizers:
        make_case(quantizer, out_dir)


if __name__ == "__main__":
    main()
