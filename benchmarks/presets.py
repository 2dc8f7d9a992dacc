"""Train the shipped presets with the repository's configs, and record them.

For each preset named: `keras-diffusion train` with its config (unchanged)
into `--runs/NAME`, timed; the trained model's sampling copy written to
`keras_diffusion/preset_files/NAME.keras`; then `keras-diffusion evaluate
--model NAME` run as a user would run it, at the record's full size on the
training backend and small (100 samples, 10 steps) on each backend, which
the tests repeat (the noise comes from each backend's own generator);
and the record, `NAME.json`, with the config, both commands, the minutes and
the hardware. Usage:

    python benchmarks/presets.py mnist_conditional --data-dir DATA --backend torch

Give the preset names to (re)make; `--list` prints the table of configs.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (config, what it is)
PRESETS = {
    "mnist": ("configs/mnist.yaml", "Unconditional MNIST digits, 28x28x1."),
    "mnist_conditional": ("configs/mnist_conditional.yaml",
                          "Class-conditional MNIST digits with classifier-free guidance "
                          "(labels 0-9 or names 'zero'..'nine'), 28x28x1."),
    "mnist_prompts": ("configs/mnist_prompts.yaml",
                      "Text-to-image MNIST digits: prompts such as 'a handwritten seven' or "
                      "'the digit 7', with classifier-free guidance, 28x28x1."),
    "fashion_mnist": ("configs/fashion_mnist.yaml", "Unconditional Fashion-MNIST, 28x28x1."),
    "cifar10": ("configs/cifar10.yaml", "Unconditional CIFAR-10, 32x32x3."),
}
# The small evaluation the tests repeat on each backend.
CHECK = dict(num=100, steps=10)


def _run(command, env):
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def _evaluate(name, backend, data_dir, env, num, steps, guidance):
    with tempfile.TemporaryDirectory() as folder:
        scores_path = Path(folder) / "scores.json"
        command = ["keras-diffusion", "evaluate", "--model", name, "--backend", backend,
                   "--num", str(num), "--steps", str(steps)]
        if guidance != 1.0:
            command += ["--guidance", str(guidance)]
        _run(command + ["--data-dir", data_dir, "--json", str(scores_path)], env)
        scores = json.loads(scores_path.read_text())
    shown = " ".join(command + ["--data-dir", "DATA"])
    row = {key: scores[key] for key in ("fid", "kid", "kid_std", "label_accuracy",
                                        "prompt_adherence", "seconds") if key in scores}
    return dict(row, num_images=num, sampler="dpmpp_2m", steps=steps, guidance=guidance,
                seed=0, backend=backend, command=shown)


def make(name, args):
    config_file, description = PRESETS[name]
    run = Path(args.runs) / name
    env = dict(os.environ, KERAS_BACKEND=args.backend, TF_CPP_MIN_LOG_LEVEL="2")
    if not args.skip_training:
        start = time.perf_counter()
        _run(["keras-diffusion", "train", "--config", config_file, "--backend", args.backend,
              "--data-dir", args.data_dir, "--output", str(run)], env)
        minutes = (time.perf_counter() - start) / 60
    else:
        minutes = _recorded_minutes(name, run)

    import keras
    import yaml

    from keras_diffusion.loading import load_model
    from keras_diffusion.precision import hardware
    from keras_diffusion.presets import model_kind
    from keras_diffusion.presets import save_preset

    model = load_model(run / "model.keras")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"].pop("data_dir", None)  # a machine path
    record = {
        "description": description,
        "dataset": config["data"]["dataset"],
        "config": config,
        "command": f"keras-diffusion train --config {config_file} --backend {args.backend}",
        "backend": args.backend,
        "training_minutes": round(minutes, 1),
        "hardware": hardware(),
        "parameters": int(model.network.count_params()),
        "date": datetime.date.today().isoformat(),
        "keras": keras.__version__,
    }
    save_preset(model, name, record)
    guided = model_kind(config) != "unconditional"
    guidance = (args.guidance or config["sampling"].get("guidance_scale") or 1.0) if guided else 1.0
    # The full evaluation on the training backend; the small one on each
    # backend, as noise is drawn by each backend's own generator.
    record["evaluation"] = [_evaluate(name, args.backend, args.data_dir, env, args.num, 20, guidance)]
    for backend in ("tensorflow", "jax", "torch"):
        record["evaluation"].append(_evaluate(
            name, backend, args.data_dir, dict(env, KERAS_BACKEND=backend), CHECK["num"],
            CHECK["steps"], guidance))
    save_preset(model, name, record)
    print(json.dumps(record["evaluation"], indent=2))


def _recorded_minutes(name, run):
    """The training minutes of a run made before: from the preset's record if
    there is one, else the time between the run's first file (its config,
    written at the start) and its model (written at the end)."""
    record = ROOT / "keras_diffusion/preset_files" / f"{name}.json"
    if record.exists():
        return json.loads(record.read_text())["training_minutes"]
    return ((run / "model.keras").stat().st_mtime - (run / "config.yaml").stat().st_mtime) / 60


def table():
    """The Markdown table of the shipped presets, from their records."""
    from keras_diffusion.presets import presets

    lines = ["| preset | config | params | MB | FID | KID | label accuracy or prompt adherence | "
             "trained |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in presets().items():
        full = record["evaluation"][0]
        accuracy = full.get("label_accuracy", full.get("prompt_adherence"))
        lines.append(
            f"| `{name}` | `{record['command'].split('--config ')[1].split()[0]}` | "
            f"{record['parameters'] / 1e6:.2f}M | {record['file_mb']:.1f} | {full['fid']:.2f} | "
            f"{full['kid']:.4f} | {'-' if accuracy is None else f'{accuracy:.1%}'} | "
            f"{record['training_minutes']:.0f} min, {record['backend']}, {record['hardware']} |")
    rows = [record["evaluation"][0] for record in presets().values()]
    if rows:
        guided = sorted({row["guidance"] for row in rows if row.get("guidance", 1.0) != 1.0})
        lines += ["", f"Scores: {rows[0]['num_images']:,} samples, DPM-Solver++(2M) "
                      f"{rows[0]['steps']} steps, against the test split, over the built-in "
                      "feature net (docs/quality.md)"
                      + (f"; guided presets at guidance {' or '.join(f'{g:g}' for g in guided)} "
                         "(see their records), prompted ones with the held-out prompts of "
                         "docs/prompts.md" if guided else "")
                      + ". Made by `python benchmarks/presets.py NAME --data-dir D --write README.md`."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"presets to make: {', '.join(PRESETS)}")
    parser.add_argument("--data-dir", help="directory holding <dataset>.npz")
    parser.add_argument("--backend", default="torch", choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--runs", default="runs/presets", help="training output directories")
    parser.add_argument("--num", type=int, default=1000, help="samples of the full evaluation")
    parser.add_argument("--skip-training", action="store_true",
                        help="re-record from the runs already in --runs")
    parser.add_argument("--guidance", type=float,
                        help="guidance of the evaluations (default: the config's sampling one)")
    parser.add_argument("--list", action="store_true", help="print the presets and configs")
    parser.add_argument("--write", help="put the table of shipped presets into this Markdown file")
    args = parser.parse_args()
    if args.write and not args.names:
        _write(args.write)
        return
    if args.list or not args.names:
        for name, (config, description) in PRESETS.items():
            print(f"{name:18} {config:32} {description}")
        return
    unknown = sorted(set(args.names) - set(PRESETS))
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {', '.join(PRESETS)}")
    if not args.data_dir:
        parser.error("--data-dir is required to train and evaluate")
    os.environ["KERAS_BACKEND"] = args.backend
    for name in args.names:
        make(name, args)
    if args.write:
        _write(args.write)


def _write(path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _markdown import write_between_markers

    write_between_markers(Path(path), "presets", table(), "Presets")


if __name__ == "__main__":
    sys.exit(main())
