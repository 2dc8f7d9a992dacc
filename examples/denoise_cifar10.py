"""Denoise CIFAR-10 test images with a diffusion model.

    python examples/denoise_cifar10.py --data-dir ../shared/data

Without --model, first trains a small unconditional model with
configs/cifar10.yaml for --train-steps steps (a few minutes on a CPU; expect
soft results: the full config trains for an hour). Then adds Gaussian noise
of std --sigma to 8 test images, lets the model estimate that std and remove
it, and writes denoise_cifar10.png: noisy | denoised | clean, a row per image.
"""

import numpy as np
from _common import model_for
from _common import parser
from _common import side_by_side

import keras_diffusion as kd


def main():
    p = parser(__doc__, "denoise_cifar10.png", train_steps=150)
    p.add_argument("--sigma", type=float, default=0.2, help="noise std on the [0, 1] scale")
    args = p.parse_args()
    model = model_for(args, "cifar10", ["training.batch_size=64"])
    clean, _ = kd.load_dataset("cifar10", data_dir=args.data_dir, split="test", limit=8)
    noisy = clean + args.sigma * np.random.default_rng(0).normal(size=clean.shape).astype("float32")
    result = model.denoise(noisy)  # sigma=None: estimated, and reported back
    def psnr(x):
        return 10 * np.log10(1 / np.mean((x - clean) ** 2))
    print(f"noise std: {args.sigma} (estimated {result.sigma:.3f}); "
          f"PSNR noisy {psnr(noisy):.2f} dB -> denoised {psnr(result.images):.2f} dB")
    kd.save_image_grid(
        side_by_side([np.clip(noisy, 0, 1), result.images, clean]), args.out, nrow=3,
        title="noisy | denoised | clean",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
