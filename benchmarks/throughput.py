"""Training and sampling throughput of keras_diffusion, per backend and
precision, optionally side by side with Hugging Face diffusers.

    python benchmarks/throughput.py --vs-diffusers --write docs/performance.md

Each backend runs in its own subprocess (Keras reads KERAS_BACKEND once per
process). With `--vs-diffusers` a diffusers `UNet2DModel` of the same shape is
measured in a subprocess before the first backend and after each one, so
each of our runs is compared with the diffusers runs just before and after it
(minutes apart on the same machine), and also with the mean of all diffusers
float32 runs, the baseline a bfloat16 run of ours has to beat. Needs the
`bench` extra (`pip install -e .[jax,torch,bench]`).

Training images/s: `model.fit` over `--train-steps` batches after a first
`fit` that compiles and warms up. Sampling images/s: one `generate` call of
`--sample-batch` images after a first call that compiles. TFLOP/s counts the
forward pass as each framework's own FLOP counter sees it (XLA's cost
analysis on JAX, `FlopCounterMode` on PyTorch) and a training step as three
forward passes.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from keras_diffusion.cli import _xla_flags_with_a_device_per_core
from keras_diffusion.cli import _usable_cores
from keras_diffusion.precision import hardware as _hardware  # Keras loads later, in each worker

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_between_markers  # noqa: E402
from ops import isa_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def hardware():
    """The machine, as `precision.hardware` names it, and whether `--isa`
    capped the frameworks' CPU kernels (then the figures are that
    instruction set's, not the CPU's own) or TensorFlow was kept off oneDNN
    (its own default on CPUs without AVX512-VNNI, AVX512-BF16, AVX-VNNI or
    AMX, which keras_diffusion overrides)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = f", kernels capped at {isa} (--isa {isa.lower()})" if isa else ""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").lower() in ("0", "false"):
        capped += ", TensorFlow without oneDNN (TF_ENABLE_ONEDNN_OPTS=0)"
    return _hardware() + capped

# The reference UNet of issue 5: 3,939,393 parameters, as diffusers' UNet2DModel below.
MODELS = {
    "mnist": dict(image_shape=(28, 28, 1), widths=(32, 64, 128), blocks_per_level=2,
                  attention_levels=(2,), groups=8, dropout=0.0),
    # The DDPM CIFAR-10 UNet (Ho 2020, appendix B): 35.7M parameters.
    "cifar10": dict(image_shape=(32, 32, 3), widths=(128, 256, 256, 256), blocks_per_level=2,
                    attention_levels=(1,), groups=32, dropout=0.1),
}


# ----------------------------------------------------------------- workers
def _timed(fn, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def build_ours(args):
    """keras_diffusion's reference model on the backend this process was
    started with, compiled in `args.precision`, and `fit(steps)`, which
    trains it on that many batches of fixed random images."""
    import keras
    import numpy as np

    import keras_diffusion as kd

    spec = MODELS[args.model]
    keras.utils.set_random_seed(0)
    from keras_diffusion.precision import resolve

    precision = resolve(args.precision)  # "auto" -> what this machine computes natively
    keras.mixed_precision.set_dtype_policy(precision)
    net_args = {k: v for k, v in spec.items() if k != "image_shape"}
    network = kd.UNet(spec["image_shape"], **net_args)
    model = kd.DiffusionModel(network, kd.DiffusionSchedule("linear", timesteps=1000), seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=args.jit_compile)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch * args.train_steps,) + spec["image_shape"], dtype="uint8")

    def fit(steps):
        return model.fit(images[: args.batch * steps], batch_size=args.batch, epochs=1,
                         shuffle=False, verbose=0).history["loss"][-1]

    return model, fit


def run_ours(args):
    """Measure keras_diffusion on the backend this process was started with."""
    import keras

    model, fit = build_ours(args)
    network, precision = model.network, keras.config.dtype_policy().name
    start = time.perf_counter()
    fit(args.warmup_steps)  # compiles, then warms up
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    loss = fit(args.train_steps)
    train_s = (time.perf_counter() - start) / args.train_steps
    result = dict(
        library="keras_diffusion", backend=keras.backend.backend(), precision=precision,
        params=int(network.count_params()), batch=args.batch,
        train_images_per_s=args.batch / train_s, first_fit_s=compile_s, loss=float(loss),
    )
    # DPM-Solver++ at 10 steps scores DDIM-50's FID (docs/quality.md): the
    # equal-quality comparison; 20 steps for reference.
    for name, sampler, steps in (("ddim50", "ddim", 50), ("dpmpp20", "dpmpp_2m", 20),
                                 ("dpmpp10", "dpmpp_2m", 10)):
        def generate():
            return model.generate(args.sample_batch, steps=steps, sampler=sampler, seed=0)

        generate()  # compile
        result[f"{name}_images_per_s"] = args.sample_batch / _timed(generate, args.sample_repeats)
    result["forward_gflops_per_image"] = _forward_gflops(network, MODELS[args.model]["image_shape"])
    result["device"] = hardware()
    return result


def _forward_gflops(network, image_shape):
    """Forward-pass GFLOP per image as the backend's own counter sees it
    (torch's FlopCounterMode, XLA's cost analysis); None on TensorFlow."""
    import keras
    import numpy as np

    x = np.zeros((1,) + image_shape, "float32")
    t = np.zeros((1,), "int32")
    backend = keras.backend.backend()
    if backend == "torch":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            network([x, t])
        return counter.get_total_flops() / 1e9
    if backend == "jax":
        import jax

        weights = [v.value for v in network.trainable_variables]
        state = [v.value for v in network.non_trainable_variables]

        def forward(weights, x, t):
            return network.stateless_call(weights, state, [x, t])[0]

        cost = jax.jit(forward).lower(weights, x, t).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) / 1e9
    return None


def _synced(fn):
    """`fn`, returning only once a CUDA device has finished its work."""
    import torch

    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


def build_diffusers(args):
    """diffusers' UNet2DModel of the reference shape and `train_step()`,
    which trains it one batch the way its `train_unconditional.py` example
    does (DDPMScheduler noise, MSE on epsilon, AdamW, EMAModel); also its
    parameter count and forward GFLOP per image."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    spec = MODELS[args.model]
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    height, width, channels = spec["image_shape"]
    levels = len(spec["widths"])
    down = ["AttnDownBlock2D" if i in spec["attention_levels"] else "DownBlock2D" for i in range(levels)]
    unet = UNet2DModel(
        sample_size=height, in_channels=channels, out_channels=channels,
        layers_per_block=spec["blocks_per_level"], block_out_channels=spec["widths"],
        down_block_types=down, up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
        norm_num_groups=spec["groups"], dropout=spec["dropout"],
    ).to(device)
    params = sum(p.numel() for p in unet.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, channels, height, width, device=device), torch.zeros(1, device=device))
    forward_gflops = counter.get_total_flops() / 1e9
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ema = EMAModel(unet.parameters(), decay=0.999)
    autocast = args.precision == "mixed_bfloat16"
    images = torch.rand(args.batch, channels, height, width, device=device) * 2 - 1

    @_synced
    def train_step():
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            pred = unet(noise_scheduler.add_noise(images, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(unet.parameters())
        return loss

    unet.train()
    return unet, train_step, int(params), forward_gflops


def run_diffusers(args):
    """The same measurements for diffusers' UNet2DModel, trained by
    `build_diffusers` and sampled with DDIMPipeline."""
    import torch
    from diffusers import DDIMPipeline
    from diffusers import DDIMScheduler

    unet, train_step, params, forward_gflops = build_diffusers(args)
    device, autocast = unet.device.type, args.precision == "mixed_bfloat16"
    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        train_step()
    first = time.perf_counter() - start
    train_s = _timed(train_step, args.train_steps)
    unet.eval()
    pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)

    @_synced
    def generate():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return pipeline(batch_size=args.sample_batch, num_inference_steps=50, output_type="np")

    generate()
    return dict(
        library="diffusers", backend="torch", precision=args.precision, params=int(params),
        batch=args.batch, train_images_per_s=args.batch / train_s, first_fit_s=first,
        loss=float(train_step()),
        ddim50_images_per_s=args.sample_batch / _timed(generate, args.sample_repeats),
        forward_gflops_per_image=forward_gflops, device=hardware(),
    )


# ------------------------------------------------------------------ driver
def _spawn(args, library, backend, precision):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(isa_environment(args.isa))
    pin = None
    if args.threads:
        # The same CPU thread budget for every framework: OpenMP (PyTorch) and
        # TF's pools by their settings (a TensorFlow worker so set used 0.99 of
        # a core); XLA has none that holds (its Eigen convolutions use every
        # core with --xla_cpu_multi_thread_eigen=false), so the JAX worker runs
        # on the first `threads` cores it may use.
        n = str(args.threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS="1")
        if backend == "jax" and hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))[:args.threads]
            pin = functools.partial(os.sched_setaffinity, 0, cores)
    command = [sys.executable, __file__, "--worker", library, "--precision", precision]
    if args.jax_data_parallel and library == "keras_diffusion" and backend == "jax":
        # What `keras-diffusion train` gives JAX on a CPU: one device per core.
        env["XLA_FLAGS"] = _xla_flags_with_a_device_per_core(env.get("XLA_FLAGS", ""), _usable_cores())
        command.append("--jax-data-parallel")
    for key in ("model", "batch", "sample_batch", "train_steps", "warmup_steps", "sample_repeats", "threads"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += ["--jit-compile", str(args.jit_compile).lower()]
    print(f"... {library} {backend} {precision}", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, preexec_fn=pin)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"{library} on {backend} failed (exit {done.returncode})")
    print(lines[-1], file=sys.stderr, flush=True)  # partial results survive an interrupted run
    return json.loads(lines[-1])


def _fmt(value, digits=1, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def table(runs):
    """Markdown table of our runs, in the order they were measured.

    Each of our runs is compared with the diffusers runs measured just before
    and just after it (same precision: the interleaved, like-for-like ratio)
    and with the mean of all diffusers float32 runs (the issue's baseline,
    which is what a bfloat16 run of ours has to beat)."""
    theirs_fp32 = [r for r in runs if r["library"] == "diffusers" and r["precision"] == "float32"]

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key)]
        return sum(values) / len(values) if values else None

    def ratio(a, b):
        return a / b if a and b else None

    fp32_train = mean(theirs_fp32, "train_images_per_s")
    fp32_ddim = mean(theirs_fp32, "ddim50_images_per_s")
    header = ("| backend | precision | train img/s | diffusers train img/s (before, after) | "
              "train vs adjacent diffusers | train vs diffusers fp32 | train TFLOP/s | "
              "DDIM-50 img/s | DPM++(2M)-20 img/s | DPM++(2M)-10 img/s | "
              "diffusers DDIM-50 img/s (before, after) | "
              "DPM++-10 vs adjacent diffusers DDIM-50 | DPM++-10 vs diffusers fp32 DDIM-50 |")
    rows = [header, "|" + " --- |" * 13]
    for i, r in enumerate(runs):
        if r["library"] != "keras_diffusion":
            continue
        before = next((x for x in reversed(runs[:i]) if x["library"] == "diffusers"), None)
        after = next((x for x in runs[i + 1:] if x["library"] == "diffusers"), None)
        adjacent = [x for x in (before, after) if x]
        gflops = r.get("forward_gflops_per_image")
        tflops = 3 * gflops * r["train_images_per_s"] / 1e3 if gflops else None
        dpm = r.get("dpmpp10_images_per_s")  # DDIM-50's quality (docs/quality.md)

        def pair(key, digits):
            return ", ".join(_fmt(x[key], digits) for x in adjacent) or "-"

        rows.append(
            f"| {r['backend']} | {r['precision']} | {_fmt(r['train_images_per_s'])} | "
            f"{pair('train_images_per_s', 1)} | "
            f"{_fmt(ratio(r['train_images_per_s'], mean(adjacent, 'train_images_per_s')), 2, 'x')} | "
            f"{_fmt(ratio(r['train_images_per_s'], fp32_train), 2, 'x')} | {_fmt(tflops, 3)} | "
            f"{_fmt(r['ddim50_images_per_s'], 2)} | {_fmt(r.get('dpmpp20_images_per_s'), 2)} | "
            f"{_fmt(dpm, 2)} | {pair('ddim50_images_per_s', 2)} | "
            f"{_fmt(ratio(dpm, mean(adjacent, 'ddim50_images_per_s')), 2, 'x')} | "
            f"{_fmt(ratio(dpm, fp32_ddim), 2, 'x')} |"
        )
    if theirs_fp32:
        rows += ["", f"diffusers float32, mean of {len(theirs_fp32)} runs: training "
                     f"{_fmt(fp32_train)} img/s, DDIM-50 {_fmt(fp32_ddim, 2)} img/s."]
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--precisions", default="float32",
                        help="comma-separated: float32, mixed_bfloat16, mixed_float16, auto")
    parser.add_argument("--model", default="mnist", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--sample-repeats", type=int, default=1)
    parser.add_argument("--jit-compile", default="auto", help="passed to model.compile: auto, true, false")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per framework (0: each framework's default); 1 gives steadier "
                             "ratios on a shared machine")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: cap every framework's CPU kernels at AVX2, as on an AVX2-only "
                             "CPU (benchmarks/ops.py says how)")
    parser.add_argument("--jax-data-parallel", action="store_true",
                        help="train and sample JAX with distribute=data_parallel over one CPU device "
                             "per core, as the keras-diffusion command can")
    parser.add_argument("--vs-diffusers", action="store_true")
    parser.add_argument("--diffusers-precision", choices=("float32", "mixed_bfloat16"),
                        help="run diffusers at this precision whatever --precisions says")
    parser.add_argument("--write", help="also write the table to this Markdown file")
    parser.add_argument("--results", help="JSON lines of an earlier run, in the order measured "
                        "(as --write records them): print the table again without measuring")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.jit_compile = {"true": True, "false": False}.get(str(args.jit_compile).lower(), "auto")

    if args.worker:
        if args.threads and (args.worker == "diffusers" or os.environ.get("KERAS_BACKEND") == "torch"):
            import torch

            torch.set_num_threads(args.threads)
        if args.worker == "diffusers":
            result = run_diffusers(args)
        elif args.jax_data_parallel:
            from keras_diffusion.distribute import distribution_scope

            with distribution_scope("data_parallel") as devices:
                result = run_ours(args)
            result["backend"] += f" (data_parallel, {devices} devices)"
        else:
            result = run_ours(args)
        print(json.dumps(result), flush=True)
        return

    if args.results:  # re-render a table from an earlier run's JSON lines
        runs = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    else:
        runs = []  # in the order measured: the table pairs each run with its neighbours
        for precision in args.precisions.split(","):
            # diffusers runs at float32 (the baseline) or bfloat16 autocast.
            theirs_precision = args.diffusers_precision or (
                "mixed_bfloat16" if precision == "mixed_bfloat16" else "float32")
            if args.vs_diffusers:
                runs.append(_spawn(args, "diffusers", "torch", theirs_precision))
            for backend in args.backends.split(","):
                runs.append(_spawn(args, "keras_diffusion", backend, precision))
                if args.vs_diffusers:
                    runs.append(_spawn(args, "diffusers", "torch", theirs_precision))
    text = table(runs)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    print(text)
    counts = sorted({(r["library"], r["params"]) for r in runs})
    print("parameters: " + ", ".join(f"{lib} {n:,}" for lib, n in counts))
    if args.write:
        setting = {0: "each framework's default threads", 1: "one thread per framework"}.get(
            args.threads, f"{args.threads} threads per framework")
        if args.jax_data_parallel:
            setting += ", JAX data_parallel"
        _write_report(Path(args.write), text, command, runs, setting)


def _write_report(path, text, command, results, setting):
    """Put the table in `path` in the block of this machine and `setting`
    (threads, distribution), so each CPU kind keeps its own tables: a run
    replaces the block of the machine it ran on and leaves the others."""
    devices = sorted({r.get("device") or "?" for r in results})
    heading = f"{', '.join(devices)}; {setting}"
    block = "\n".join([
        f"#### {heading}",
        "",
        f"Measured with `{command}`, {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        text,
        "",
        "<details><summary>Raw results (JSON lines)</summary>",
        "",
        "```",
        *[json.dumps(r) for r in results],
        "```",
        "</details>",
    ])
    write_between_markers(path, _block_key(heading), block, "Performance", after="throughput-")


def _block_key(heading):
    """The marker key of a block: its heading, lower-cased, with every run
    of other characters turned into one dash."""
    import re

    return "throughput-" + re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


if __name__ == "__main__":
    main()
