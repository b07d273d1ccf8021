"""CPU cost of one training step of candidate shapes-teacher UNets (the measurement behind DEFAULT_ARCH).

    OMP_NUM_THREADS=1 python benchmarks/teacher_arch_cost.py [--batch 32] [--steps 5]

Each candidate is a diffusers UNet2DConditionModel on 32×32 pixels with cross-attention to 64-d text states; a
step is forward + backward + AdamW on a batch of random inputs. Reported: parameters and CPU seconds per step
(mean of `--steps` after 3 warm-up steps, one thread).
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import UNet2DConditionModel

DOWN, CROSS_DOWN, UP, CROSS_UP = "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
CANDIDATES = {
    "3 levels 16/32/64, attention 8x8 (first teacher)":
        ((16, 32, 64), (DOWN, DOWN, CROSS_DOWN), (CROSS_UP, UP, UP)),
    "3 levels 16/32/64, attention 16x16 + 8x8":
        ((16, 32, 64), (DOWN, CROSS_DOWN, CROSS_DOWN), (CROSS_UP, CROSS_UP, UP)),
    "3 levels 32/64/96, attention 16x16 + 8x8":
        ((32, 64, 96), (DOWN, CROSS_DOWN, CROSS_DOWN), (CROSS_UP, CROSS_UP, UP)),
    "3 levels 32/64/128, attention 8x8":
        ((32, 64, 128), (DOWN, DOWN, CROSS_DOWN), (CROSS_UP, UP, UP)),
    "4 levels 16/32/64/128, attention 8x8 + 4x4 (shipped)":
        ((16, 32, 64, 128), (DOWN, DOWN, CROSS_DOWN, CROSS_DOWN), (CROSS_UP, CROSS_UP, UP, UP)),
}


def step_cost(channels, down, up, batch: int, steps: int) -> tuple[int, float]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=3, out_channels=3, cross_attention_dim=64,
                                attention_head_dim=16, norm_num_groups=8, layers_per_block=1,
                                block_out_channels=channels, down_block_types=down, up_block_types=up)
    optimizer = torch.optim.AdamW(unet.parameters(), 1e-3)
    x, text, t = torch.randn(batch, 3, 32, 32), torch.randn(batch, 24, 64), torch.randint(0, 1000, (batch,))
    for i in range(3 + steps):
        if i == 3:
            start = time.process_time()
        unet(x, t, encoder_hidden_states=text).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return sum(p.numel() for p in unet.parameters()), (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| UNet | parameters | CPU s / step |\n|---|---|---|")
    for name, (channels, down, up) in CANDIDATES.items():
        params, seconds = step_cost(channels, down, up, args.batch, args.steps)
        print(f"| {name} | {params / 1e6:.2f} M | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
