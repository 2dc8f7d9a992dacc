"""Fill in the missing part of MNIST digits (RePaint inpainting).

    python examples/inpaint_mnist.py --data-dir ../shared/data --mask center

Without --model, first trains a small unconditional model with
configs/mnist.yaml for --train-steps steps (a few minutes on a CPU). Then
hides part of 8 test digits (--mask: center, left-half or random:P), lets
the model fill it in, and writes inpaint_mnist.png: input (missing pixels
grey) | inpainted | original, a row per digit. Known pixels come back exactly.
"""

import numpy as np
from _common import model_for
from _common import parser
from _common import side_by_side

import keras_diffusion as kd


def main():
    p = parser(__doc__, "inpaint_mnist.png", train_steps=300)
    p.add_argument("--mask", default="center", help="center, left-half or random:P")
    p.add_argument("--steps", type=int, default=50, help="reverse steps of one RePaint pass")
    args = p.parse_args()
    model = model_for(args, "mnist")
    digits, _ = kd.load_dataset("mnist", data_dir=args.data_dir, split="test", limit=8)
    mask = kd.make_mask(args.mask, digits.shape, seed=0)
    filled = model.inpaint(digits, mask, steps=args.steps, seed=0)
    shown = np.where(mask > 0, digits, 0.5)
    kd.save_image_grid(
        side_by_side([shown, filled, digits]), args.out, nrow=3,
        title=f"{args.mask} mask | inpainted | original",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
