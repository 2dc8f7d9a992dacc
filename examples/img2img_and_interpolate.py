"""Image-to-image (SDEdit) and interpolation on MNIST.

    python examples/img2img_and_interpolate.py --data-dir ../shared/data

Without --model, first trains a small unconditional model with
configs/mnist.yaml for --train-steps steps (a few minutes on a CPU). Then
  * re-imagines 4 test digits at strengths 0.3 and 0.6 (how much of each
    is noised away before the model redraws it), and
  * walks from one test digit to another through their DDIM-inverted noises,
and writes img2img_and_interpolate.png: the img2img rows (input | 0.3 | 0.6)
and below them the path from the first digit to the second.
"""

import numpy as np
from _common import model_for
from _common import parser
from _common import side_by_side

import keras_diffusion as kd


def main():
    p = parser(__doc__, "img2img_and_interpolate.png", train_steps=300)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    args = p.parse_args()
    model = model_for(args, "mnist")
    digits, _ = kd.load_dataset("mnist", data_dir=args.data_dir, split="test", limit=6)
    edits = [model.img2img(digits[:4], strength=s, steps=args.steps, seed=0) for s in (0.3, 0.6)]
    path = model.interpolate(digits[4], digits[5], num=6, steps=args.steps)
    # Rows of 6: two digits' input | 0.3 | 0.6 per row, then the path.
    grid = np.concatenate([np.stack(side_by_side([digits[:4], *edits])), path])
    kd.save_image_grid(grid, args.out, nrow=6,
                       title="input | 0.3 | 0.6; last row: a to b")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
