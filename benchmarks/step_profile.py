"""Where a PyTorch training step's time goes: keras_diffusion's reference
UNet on the PyTorch backend against diffusers' UNet2DModel of the same
shape, profiled in one process with `torch.profiler`.

    python benchmarks/step_profile.py --threads 1

Both steps call the same ATen kernels for the heavy work (oneDNN
convolutions, the fused `group_norm`, matrix products for attention and
the time embedding), so the time a step spends in them bounds how much
faster than diffusers any step built on those kernels can be: diffusers'
step time over the sum, family by family, of the lesser of the two
libraries' kernel times (the bound a step doing nothing else would reach).
Self CPU time per ATen op, per step, summed into those families; "other"
is everything else (element-wise ops, the optimizer, the EMA, Python and
framework overhead).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).parent))
from throughput import MODELS  # noqa: E402
from throughput import build_diffusers  # noqa: E402
from throughput import build_ours  # noqa: E402
from throughput import hardware  # noqa: E402

# ATen op names (substrings) of the kernels both libraries share.
FAMILIES = {
    "convolution": ("convolution",),
    "group norm": ("group_norm",),
    "matmul": ("addmm", "aten::mm", "bmm", "baddbmm", "scaled_dot_product", "_softmax"),
}


def _family(name):
    return next((family for family, keys in FAMILIES.items() if any(k in name for k in keys)), "other")


def profile(train, steps):
    """Wall ms per step of `train(steps)` (unprofiled), and {family: self
    CPU ms per step} of another `train(steps)`, profiled."""
    import torch
    from torch.profiler import ProfilerActivity

    train(2)  # warm-up: first calls allocate and pick kernels
    start = time.perf_counter()
    train(steps)
    wall = (time.perf_counter() - start) / steps * 1e3
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        train(steps)
    ms = dict.fromkeys([*FAMILIES, "other"], 0.0)
    for event in prof.key_averages():
        ms[_family(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return wall, ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4,
                        help="steps timed, then as many profiled (after 2 to warm up)")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    args = parser.parse_args()
    args.precision, args.jit_compile, args.train_steps = "float32", "auto", args.steps
    if os.environ["KERAS_BACKEND"] != "torch":
        parser.error("this profiles the PyTorch backend; "
                     f"KERAS_BACKEND is {os.environ['KERAS_BACKEND']!r}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _, fit = build_ours(args)
    rows = {"keras_diffusion": profile(fit, args.steps)}  # model.fit over `steps` batches
    _, train_step, _, _ = build_diffusers(args)
    rows["diffusers"] = profile(lambda n: [train_step() for _ in range(n)], args.steps)

    kernels = {lib: sum(ms[f] for f in FAMILIES) for lib, (_, ms) in rows.items()}
    # Each family at the better library's time, and nothing else at all.
    floor = sum(min(ms[f] for _, ms in rows.values()) for f in FAMILIES)
    ceiling = rows["diffusers"][0] / floor
    print(f"{hardware()}; batch {args.batch}, float32, {torch.get_num_threads()} thread(s), "
          f"ms per training step (self CPU time of {args.steps} profiled steps)")
    families = [*FAMILIES, "other"]
    print("| library | step, unprofiled | " + " | ".join(families) + " | shared kernels, share |")
    print("|---" * (len(families) + 3) + "|")
    for lib, (wall, ms) in rows.items():
        total = sum(ms.values())
        print(f"| {lib} | {wall:.0f} | " + " | ".join(f"{ms[f]:.0f}" for f in families)
              + f" | {kernels[lib]:.0f} ({kernels[lib] / total:.0%}) |")
    print(f"A step that spent only each family's better time in these kernels, and nothing "
          f"else, would take {floor:.0f} ms: at most {ceiling:.2f}x diffusers' step.")


if __name__ == "__main__":
    main()
