"""Sample quality against sampler and step count, for one trained model.

    python benchmarks/quality.py --model runs/mnist/model.keras --data-dir ../shared/data \\
        --num 500 --write docs/quality.md

For each `sampler:steps` in --runs (default: DDPM-1000, DDIM 10/20/50/250,
DPM-Solver++ 10/20), generates --num images from the same seed and scores
them against the dataset's whole test split with the built-in feature net
(`keras_diffusion.metrics`): FID, KID and, for a class-conditional model,
the share of samples classified as their label. With --write the table goes
into the file between `quality-steps:<run name>` markers.

FID falls as --num grows (the covariance of a small sample is noisy), so
compare rows of one table, made with one --num; KID is unbiased.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

from _markdown import write_between_markers

DEFAULT_RUNS = ("ddpm:1000", "ddim:10", "ddim:20", "ddim:50", "ddim:250", "dpmpp_2m:10", "dpmpp_2m:20")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", help="default: from config.yaml beside the model")
    parser.add_argument("--data-dir")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="SAMPLER:STEPS")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--write", help="Markdown file to put the table in")
    args = parser.parse_args()

    import keras

    import keras_diffusion as kd
    from keras_diffusion import metrics
    from keras_diffusion.config import dataset_of_run

    dataset = args.dataset or dataset_of_run(args.model)
    model = kd.load_model(args.model)
    net = metrics.get_feature_net(dataset)
    reference = net.features(kd.load_dataset(dataset, args.data_dir, split="test")[0])
    rows = []
    for run in args.runs:
        sampler, _, steps = run.partition(":")
        scores = metrics.score_model(
            model, feature_net=net, reference_features=reference, num_images=args.num,
            steps=int(steps), sampler=sampler, seed=args.seed,
            guidance_scale=args.guidance, batch_size=args.batch_size,
        )
        rows.append((sampler, int(steps), scores))
        accuracy = f", label accuracy {scores['label_accuracy']:.2%}" if "label_accuracy" in scores else ""
        print(f"{sampler:>12} {steps:>5}: FID {scores['fid']:8.3f}  KID {scores['kid']:.5f} "
              f"± {scores['kid_std']:.5f}{accuracy}  ({scores['seconds']:.0f} s)", flush=True)

    name = Path(args.model).parent.name
    command = "python benchmarks/quality.py " + " ".join(
        shlex.quote(arg) for arg in sys.argv[1:] if arg != args.data_dir and arg != "--data-dir"
    ) + (" --data-dir DATA" if args.data_dir else "")
    text = table(name, dataset, rows, args, net, command, keras.backend.backend())
    print(text)
    if args.write:
        write_between_markers(Path(args.write), f"quality-steps:{name}", text, "Sample quality")
        print(f"wrote {args.write}")


def table(name, dataset, rows, args, net, command, backend):
    conditional = "label_accuracy" in rows[0][2]
    lines = [
        f"### {name}: quality against sampler steps ({args.num} samples, seed {args.seed}"
        + (f", guidance {args.guidance:g}" if conditional else "") + ")",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}, Keras backend {backend}. Scored "
        f"against the {dataset} test split with the built-in `{net.name}` feature net "
        f"(test accuracy {net.test_accuracy:.2%}).",
        "",
        "| sampler | steps | FID | KID | " + ("label accuracy | " if conditional else "")
        + "sampling s |",
        "|---|---|---|---|" + ("---|" if conditional else "") + "---|",
    ]
    for sampler, steps, scores in rows:
        lines.append(
            f"| {sampler} | {steps} | {scores['fid']:.3f} | {scores['kid']:.4f} ± "
            f"{scores['kid_std']:.4f} | "
            + (f"{scores['label_accuracy']:.2%} | " if conditional else "")
            + f"{scores['seconds']:.0f} |"
        )
    reference = [scores for sampler, steps, scores in rows if sampler == "ddpm" and steps >= 1000]
    fast = [(scores["fid"], sampler, steps) for sampler, steps, scores in rows if steps <= 20]
    if reference and fast:
        best = min(fast)
        ratio = best[0] / reference[0]["fid"]
        lines += ["", f"Best sampler at 20 steps or fewer: {best[1]} {best[2]} steps, FID "
                      f"{best[0]:.3f}, {ratio:.2f}x DDPM-1000's {reference[0]['fid']:.3f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
