"""Restoration benchmark: a trained diffusion model against classical methods.

    pip install -e ".[bench]"
    python benchmarks/restoration.py --data-dir ../shared/data \\
        --mnist-model runs/mnist/model.keras --cifar10-model runs/cifar10/model.keras \\
        --write docs/restoration.md

On the first --num test images of each dataset whose model is given:

* denoising: Gaussian noise of std 0.1, 0.2 and 0.3 (on the [0, 1] scale,
  not clipped, one fixed draw shared by every method); PSNR and SSIM of
  `model.denoise` (sigma given; 1 step = the posterior-mean estimate, and
  DDIM with --denoise-steps; and 1 step with sigma estimated from the
  images), BM3D (`bm3d` package, sigma given) and scikit-image's non-local
  means (sigma given, h = 0.8 sigma, 5x5 patches, 13x13 search window);
* inpainting: a centred square of half the side missing, and 50% of the
  pixels missing at random (a new draw per image); PSNR over the missing
  pixels of `model.inpaint` (RePaint) and of scikit-image's biharmonic
  inpainting.

BM3D costs about 1 s of CPU per MNIST image and 3 s per CIFAR-10 image
and noise level; --bm3d-num N runs it on the first N images only. The
denoising table then gains two columns, every method's PSNR and SSIM over
those same N images, and the bold marks and the verdicts use them, so BM3D
is always compared on the images it saw.

PSNR is per image (peak 1.0) and then averaged; so is SSIM. The tables go to
stdout, and with --write into the file, each dataset's between its own
`restoration-results:<dataset>` markers (appended when they are missing), so
one dataset can be re-measured without touching the other.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from _markdown import write_between_markers

SIGMAS = (0.1, 0.2, 0.3)
MASKS = ("center", "random:0.5")


def main():
    args = _parse()
    import keras

    import keras_diffusion as kd

    datasets = [(name, path) for name, path in (("mnist", args.mnist_model),
                                                 ("cifar10", args.cifar10_model)) if path]
    if not datasets:
        sys.exit("give --mnist-model and/or --cifar10-model")
    for dataset, model_path in datasets:
        model = kd.load_model(model_path)
        clean, _ = kd.load_dataset(dataset, data_dir=args.data_dir, split="test", limit=args.num)
        print(f"{dataset}: {len(clean)} images, model {model_path}", flush=True)
        text = report(dataset, model_path, len(clean), denoising(model, clean, args),
                      inpainting(model, clean, args), args, keras.backend.backend())
        print(text)
        if args.write:
            write_between_markers(Path(args.write), f"restoration-results:{dataset}", text,
                                  "Restoration benchmark")
            print(f"wrote {args.write}")


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory holding mnist.npz and cifar10.npz")
    p.add_argument("--mnist-model", help=".keras model trained on MNIST (e.g. configs/mnist.yaml)")
    p.add_argument("--cifar10-model", help=".keras model trained on CIFAR-10 (configs/cifar10.yaml)")
    p.add_argument("--num", type=int, default=500, help="test images per dataset")
    p.add_argument("--denoise-steps", type=int, default=10, help="DDIM steps of the multi-step denoiser")
    p.add_argument("--inpaint-steps", type=int, default=50, help="RePaint steps per pass")
    p.add_argument("--jump-length", type=int, default=5)
    p.add_argument("--resamples", type=int, default=4)
    p.add_argument("--bm3d-num", type=int, help="run BM3D on the first N images only (default: all)")
    p.add_argument("--batch-size", type=int, default=100, help="images per compiled model call")
    p.add_argument("--write", help="Markdown file to put the table in (e.g. docs/restoration.md)")
    return p.parse_args()


# ------------------------------------------------------------------ metrics
def ssim(restored, clean):
    from skimage.metrics import structural_similarity

    return np.array([
        structural_similarity(np.clip(r, 0, 1), c, data_range=1.0, channel_axis=-1)
        for r, c in zip(restored, clean)
    ])


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# ---------------------------------------------------------------- denoising
def denoising(model, clean, args):
    import keras_diffusion as kd

    rng = np.random.default_rng(0)
    rows = []
    for sigma in SIGMAS:
        noisy = (clean + sigma * rng.normal(size=clean.shape)).astype("float32")
        methods = {
            "noisy input": lambda: noisy,
            "diffusion, 1 step": lambda: model.denoise(
                noisy, sigma=sigma, steps=1, batch_size=args.batch_size).images,
            f"diffusion, DDIM {args.denoise_steps} steps": lambda: model.denoise(
                noisy, sigma=sigma, steps=args.denoise_steps, batch_size=args.batch_size).images,
            "diffusion, 1 step, sigma estimated": lambda: model.denoise(
                noisy, steps=1, batch_size=args.batch_size).images,
            "BM3D": lambda: bm3d_denoise(noisy[:args.bm3d_num], sigma),
            "non-local means": lambda: nlm_denoise(noisy, sigma),
        }
        for name, fn in methods.items():
            restored, seconds = timed(fn)
            target = clean[:len(restored)]
            rows.append((sigma, name, kd.metrics.psnr(restored, target), ssim(restored, target),
                         seconds / len(restored)))
            print(f"  sigma {sigma} {name}: PSNR {rows[-1][2].mean():.2f} "
                  f"SSIM {rows[-1][3].mean():.3f} ({len(restored)} images)", flush=True)
    return rows


def bm3d_denoise(noisy, sigma):
    import bm3d

    if noisy.shape[-1] == 3:
        return np.stack([bm3d.bm3d_rgb(image, sigma) for image in noisy])
    return np.stack([bm3d.bm3d(image[..., 0], sigma_psd=sigma)[..., None] for image in noisy])


def nlm_denoise(noisy, sigma):
    from skimage.restoration import denoise_nl_means

    return np.stack([
        denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                         fast_mode=True, channel_axis=-1)
        for image in noisy
    ]).reshape(noisy.shape)


# --------------------------------------------------------------- inpainting
def inpainting(model, clean, args):
    import keras_diffusion as kd

    rows = []
    for kind in MASKS:
        known = kd.make_mask(kind, clean.shape, seed=0) > 0
        missing = ~np.broadcast_to(known, clean.shape)
        methods = {
            f"diffusion (RePaint {args.inpaint_steps} steps, j={args.jump_length}, r={args.resamples})":
                lambda: model.inpaint(clean, known, steps=args.inpaint_steps, jump_length=args.jump_length,
                                      resamples=args.resamples, seed=0, batch_size=args.batch_size),
            "biharmonic": lambda: biharmonic_inpaint(clean, known),
        }
        for name, fn in methods.items():
            restored, seconds = timed(fn)
            score = kd.metrics.psnr(restored, clean, missing).mean()
            rows.append((kind, name, score, seconds / len(clean)))
            print(f"  {kind} {name}: PSNR (missing pixels) {rows[-1][2]:.2f}", flush=True)
    return rows


def biharmonic_inpaint(images, known):
    from skimage.restoration import inpaint_biharmonic

    masks = np.broadcast_to(known, images.shape[:-1] + (1,))[..., 0]
    return np.stack([
        inpaint_biharmonic(image, ~mask, channel_axis=-1) for image, mask in zip(images, masks)
    ])


# ------------------------------------------------------------------- report
def report(dataset, model_path, num, denoise_rows, inpaint_rows, args, backend):
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    subset = min(len(row[2]) for row in denoise_rows)
    denoise_rows = _summarise(denoise_rows, subset)
    lines = [
        f"### {dataset}: denoising, first {num} test images", "",
        f"Made by `{command}` (model `{model_path}`, Keras backend {backend}, "
        f"{time.strftime('%Y-%m-%d')}). Best method per noise level in bold.", "",
    ]
    partial = subset < num  # BM3D saw a prefix: add every method's scores on it
    if partial:
        lines += [f"BM3D ran on the first {subset} images only; the last two score columns are every "
                  f"method on those {subset} images, and the bold marks and verdicts use them.", ""]
    head = ["sigma", "method", "PSNR (dB)", "SSIM"]
    head += [f"PSNR, first {subset}", f"SSIM, first {subset}"] if partial else []
    lines += [_row(*head, "s / image"), _row(*["---"] * (len(head) + 1)).replace(" ", "")]
    for sigma, name, p, s, t, full in _bold_best(denoise_rows, group=0, value=2):
        scores = _scores(full) + (f"{p:.2f}", f"{s:.3f}") if partial else (f"{p:.2f}", f"{s:.3f}")
        lines.append(_row(sigma, name, *scores, f"{t:.4f}"))
    lines += ["", f"### {dataset}: inpainting, PSNR over the missing pixels", "",
              "| mask | method | PSNR (dB) | s / image |", "|---|---|---|---|"]
    lines += [_row(kind, name, f"{p:.2f}", f"{t:.4f}")
              for kind, name, p, t in _bold_best(inpaint_rows, group=0, value=2)]
    return "\n".join(lines + [""] + _verdicts(dataset, denoise_rows, inpaint_rows))


def _summarise(rows, subset):
    """(sigma, name, PSNR, SSIM, s/image) with the mean scores over the first
    `subset` images, and the means over all of a method's images (None where
    it saw only the subset) as a sixth field."""
    out = []
    for sigma, name, p, s, t in rows:
        full = (p.mean(), s.mean()) if len(p) > subset else None
        out.append((sigma, name, p[:subset].mean(), s[:subset].mean(), t, full))
    return out


def _scores(full):
    return ("–", "–") if full is None else (f"{full[0]:.2f}", f"{full[1]:.3f}")


def _row(*cells):
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _bold_best(rows, group, value):
    """Mark the best method of each group (the noisy input aside) in bold."""
    best = {}
    for row in rows:
        if row[1] != "noisy input":
            best[row[group]] = max(best.get(row[group], -np.inf), row[value])
    return [
        row[:1] + (f"**{row[1]}**",) + row[2:] if row[value] == best.get(row[group]) and row[1] != "noisy input"
        else row
        for row in rows
    ]


def _verdicts(dataset, denoise_rows, inpaint_rows):
    """One line per setting: does the best diffusion variant beat the best
    classical baseline (by PSNR)?"""
    out = []
    for group, rows, baselines in (
        ("sigma", denoise_rows, ("BM3D", "non-local means")),
        ("mask", inpaint_rows, ("biharmonic",)),
    ):
        for key in dict.fromkeys(row[0] for row in rows):
            ours = max((row for row in rows if row[0] == key and row[1].startswith("diffusion")),
                       key=lambda row: row[2])
            theirs = max((row for row in rows if row[0] == key and row[1] in baselines),
                         key=lambda row: row[2])
            verdict = "beats" if ours[2] > theirs[2] else "loses to"
            out.append(f"- {dataset}, {group} {key}: {ours[1]} ({ours[2]:.2f} dB) {verdict} "
                       f"{theirs[1]} ({theirs[2]:.2f} dB).")
    return out


if __name__ == "__main__":
    main()
