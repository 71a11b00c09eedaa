"""Vision tokenizer throughput: emu3 vs transformers' Emu3VQVAE, same weights, same run.

Full-size (released, 270.7M parameters) configuration with random weights. For each resolution:
image encode/decode (one image) and video clip encode/decode (one 4-frame clip). Baseline:
transformers' Emu3VQVAE in fp32 (its default SDPA attention). Ours: fp32 (the default, with its
fast paths) and bf16 weights (`--dtype bfloat16`, different rounding). Correctness is checked in
the same run: fp32 codes must equal the baseline's, decodes must agree within 1e-3.

    python benchmarks/bench_vq.py                 # 256 and 512, about 15 minutes on 2 CPU cores
    python benchmarks/bench_vq.py --sizes 256     # quicker
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from emu3.reference import emu3_vqvae
from emu3.vq import VisionVQ, vq_config


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cell (best is reported)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    ours = VisionVQ(vq_config("emu3")).eval().to(args.device)
    with torch.no_grad():  # a codebook with spread, so that codes are diverse
        ours.quantize.embedding.weight.normal_(0, 0.05)
    ref = emu3_vqvae(ours)
    ours_bf16 = VisionVQ(vq_config("emu3")).eval().to(args.device)
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16.to(torch.bfloat16)

    def ref_encode(x):
        sizes = torch.tensor([x.shape[-2:]] * x.shape[0])
        return torch.stack(ref.encode(x, image_sizes=sizes).image_tokens)

    print(f"# emu3 vs transformers {transformers.__version__} Emu3VQVAE, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {args.device}")
    print("| input | task | transformers fp32 (s) | emu3 fp32 (s) | speed-up | emu3 bf16 (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        warm = torch.rand(1, 3, 64, 64, device=args.device) * 2 - 1  # prime oneDNN kernels for every variant
        for fn in (ref_encode, ours.encode, ours_bf16.encode):
            fn(warm)
        for size in args.sizes:
            g = torch.Generator().manual_seed(size)
            image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(args.device)
            clip = (torch.rand(1, 4, 3, size, size, generator=g) * 2 - 1).to(args.device)
            for name, x in ((f"{size}x{size} image", image), (f"4x{size}x{size} clip", clip)):
                t_ref, codes_ref = timed(lambda x=x: ref_encode(x), args.repeats)
                t_ours, codes = timed(lambda x=x: ours.encode(x), args.repeats)
                t_bf16, codes_bf16 = timed(lambda x=x: ours_bf16.encode(x), args.repeats)
                assert torch.equal(codes, codes_ref), "fp32 codes differ from transformers"
                agree = (codes_bf16 == codes_ref).float().mean().item()
                print(f"| {name} | encode | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.2f}x | {t_bf16:.2f} | "
                      f"{t_ref / t_bf16:.2f}x (codes {agree:.0%} equal) |", flush=True)
                t_ref, pix_ref = timed(lambda c=codes_ref: ref.decode(c), args.repeats)
                t_ours, pix = timed(lambda c=codes_ref: ours.decode(c), args.repeats)
                t_bf16, pix_bf16 = timed(lambda c=codes_ref: ours_bf16.decode(c), args.repeats)
                err = (pix - pix_ref).abs().max().item()
                assert err < 1e-3, f"fp32 decode differs from transformers by {err}"
                err_bf16 = (pix_bf16.float() - pix_ref).abs().max().item()
                print(f"| {name} | decode | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.2f}x | {t_bf16:.2f} | "
                      f"{t_ref / t_bf16:.2f}x (max err {err_bf16:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
