"""Class-conditional MNIST with classifier-free guidance.

    python examples/generate_mnist.py --data-dir ../shared/data --guidance 2

Without --model, first trains a small class-conditional model with
configs/mnist_conditional.yaml for --train-steps steps (a few minutes on a
CPU). Then samples 4 digits of each class from the same noise twice, without
guidance (w = 0: the unconditional model) and with it (w = --guidance), and
writes generate_mnist.png: a row per class, unguided | guided side by side.
"""

from _common import model_for
from _common import parser
from _common import side_by_side

import keras_diffusion as kd


def main():
    p = parser(__doc__, "generate_mnist.png", train_steps=400)
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale w")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    args = p.parse_args()
    model = model_for(args, "mnist_conditional")
    labels = [digit for digit in range(10) for _ in range(4)]  # class names work too: "7"
    unguided = model.generate(40, steps=args.steps, seed=0, labels=labels, guidance_scale=0.0)
    guided = model.generate(40, steps=args.steps, seed=0, labels=labels, guidance_scale=args.guidance)
    rows = [image for c in range(10) for image in (*unguided[4 * c:4 * c + 4], *guided[4 * c:4 * c + 4])]
    kd.save_image_grid(rows, args.out, nrow=8, title=f"digits 0-9: w = 0 | w = {args.guidance:g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
