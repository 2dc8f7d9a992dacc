"""Where a Stable Diffusion UNet step spends its time, op by op, on each
backend and in diffusers (float32, this CPU).

    python benchmarks/sd_profile.py --write docs/stable_diffusion.md

One guided UNet evaluation (batch 2, SD 1.5 size: 64x64 latents, 77-token
context) of the random pipeline `benchmarks/stable_diffusion.py` builds (the
same folder, reused), run once to compile or warm up, then once under the
framework's own profiler:

- PyTorch (ours on the torch backend, and diffusers): `torch.profiler`,
  self CPU time per `aten::` op;
- JAX and TensorFlow: the profiler's XSpace trace, read with
  `jax.profiler.ProfileData`: the time of each XLA thunk (JAX) or
  TensorFlow op (graph mode) on the threads that execute them.

Op names are sorted into a few kinds (convolution, matmul, attention,
layout copies, normalisation, the rest), so the backends compare line by
line. Kinds sum the threads' busy time: on two cores a kind can exceed the
step's wall time.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_between_markers  # noqa: E402
from stable_diffusion import write_random_pipeline  # noqa: E402
from throughput import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("convolution", "matmul", "attention", "layout copy", "normalisation", "other")
# First match wins; names are lowercased. JAX's XLA:CPU runs dots as
# YNNPACK fusions (`ynn_fusion`), its convolutions on Eigen (`convolution`).
_PATTERNS = (
    ("attention", r"flash_attention|scaled_dot_product|softmax|exponential"),
    ("convolution", r"conv"),
    ("matmul", r"matmul|\bmm\b|addmm|\bdot|gemm|einsum|ynn_fusion|bmm"),
    ("layout copy", r"copy|transpose|clone|contiguous|permute"),
    ("normalisation", r"norm|mean|variance|rsqrt|reduce|moments"),
)
# Bookkeeping events of the trace, not work.
_SKIP = re.compile(r"threadpool|await|^end: |thunkexecutor|^\$|pjit|execute|handle inputs|"
                   r"allocate|parsearguments|collectgarbage|functionrun|executorstate|"
                   r"^tf_function|eagerexecute|eagerkernel|__inference|runhandler|"
                   r"rendezvous|partitionedcall|_send|_recv|retval|^arg$|identity")


def kind_of(name):
    name = name.lower()
    for kind, pattern in _PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


def _inputs(context_dim):
    import numpy as np

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 64, 64, 4)).astype("float32")
    context = rng.standard_normal((2, 77, context_dim)).astype("float32")
    return latents, np.full((2,), 500, "int32"), context


# ------------------------------------------------------------------ workers
def _torch_profile(fn):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    kinds, ops = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            seconds = event.self_cpu_time_total / 1e6
            kinds[kind_of(event.key)] += seconds
            ops[event.key] += seconds
    return wall, kinds, ops


def _hlo_kinds(hlo_text):
    """`{fusion name: kind}` from XLA's compiled HLO text: a fusion holding
    a `convolution` is one, else one holding a `dot` is a matmul, else the
    kind its own name gives."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = bodies.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    kinds = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.-]+) = .* fusion\(.*calls=%?([\w.-]+)", line)
        if match:
            body = "\n".join(bodies.get(match.group(2), ()))
            kinds[match.group(1)] = ("convolution" if " convolution(" in body
                                     else "matmul" if " dot(" in body else None)
    return kinds


def _xspace_profile(fn, start_trace, stop_trace, fusions=None):
    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp(prefix="sd-profile-")
    start_trace(folder)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    stop_trace()
    paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(paths[0])
    kinds, ops = defaultdict(float), defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = event.name
                if _SKIP.search(name.lower()):
                    continue
                kind = (fusions or {}).get(name)
                # TensorFlow names an op "<layer path>:<op type>"; XLA a
                # thunk "<instruction>.<n>".
                op = re.sub(r"[.:]\d+$", "", name.rsplit(":", 1)[-1])
                if kind is not None:
                    op = f"{op} ({kind})"
                seconds = event.duration_ns / 1e9
                kinds[kind or kind_of(op)] += seconds
                ops[op] += seconds
    return wall, kinds, ops


def run_diffusers(folder):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet")
    latents, t, context = _inputs(unet.config.cross_attention_dim)
    args = (torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t),
            torch.from_numpy(context))
    unet(*args)  # warm-up
    return ("diffusers", "torch", *_torch_profile(lambda: unet(*args)))


def run_ours(folder):
    import keras

    import keras_diffusion as kd
    from keras_diffusion import pipeline

    model = kd.load_model(folder)
    step = pipeline.compiled_network(model)
    inputs = [keras.ops.convert_to_tensor(v) for v in _inputs(model.network.context_dim)]

    def run():
        keras.ops.convert_to_numpy(step(*inputs))

    run()  # compiles
    name = keras.backend.backend()
    if name == "torch":
        measured = _torch_profile(run)
    elif name == "jax":
        import jax

        # The same program as `step`'s, compiled again for its fusions' names.
        weights, state = pipeline.sampling_state(model)
        program = jax.jit(lambda w, s, *x: pipeline.network_function(model, w, s)(list(x)))
        fusions = _hlo_kinds(program.lower(weights, state, *inputs).compile().as_text())
        measured = _xspace_profile(run, jax.profiler.start_trace, jax.profiler.stop_trace,
                                   fusions)
    else:
        import tensorflow as tf

        measured = _xspace_profile(run, tf.profiler.experimental.start,
                                   tf.profiler.experimental.stop)
    return ("keras_diffusion", name, *measured)


# ------------------------------------------------------------------- driver
def _spawn(folder, library, backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, __file__, "--worker", library, "--folder", str(folder)]
    print(f"... {library} {backend}", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"{library} on {backend} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def table(runs):
    names = ["diffusers" if r["library"] == "diffusers" else f"ours, {r['backend']}" for r in runs]
    rows = ["| op kind | " + " | ".join(names) + " |", "|---" * (len(runs) + 1) + "|"]
    for kind in KINDS:
        rows.append(f"| {kind} | " + " | ".join(f"{r['kinds'].get(kind, 0.0):.2f}"
                                                for r in runs) + " |")
    rows.append("| **step wall time** | " + " | ".join(f"**{r['wall_s']:.2f}**" for r in runs)
                + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--folder", type=Path, default=ROOT / "build" / "sd-sd15")
    parser.add_argument("--top", type=int, default=8, help="ops listed per run")
    parser.add_argument("--write", help="put the table into this Markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = run_diffusers if args.worker == "diffusers" else run_ours
        library, backend, wall, kinds, ops = worker(args.folder)
        top = sorted(ops.items(), key=lambda item: -item[1])[:args.top]
        print(json.dumps(dict(library=library, backend=backend, wall_s=wall, kinds=kinds,
                              top_ops=[[name, round(s, 3)] for name, s in top])))
        return
    write_random_pipeline("sd15", args.folder)
    runs = [_spawn(args.folder, "diffusers", "torch")]
    runs += [_spawn(args.folder, "keras_diffusion", b) for b in args.backends.split(",")]
    text = table(runs)
    print(text)
    for r in runs:
        print(json.dumps(r))
    if args.write:
        command = "python benchmarks/sd_profile.py " + " ".join(sys.argv[1:])
        block = "\n".join([
            f"#### {hardware()}: seconds per op kind in one guided UNet step (SD 1.5, batch 2)",
            "", f"Measured with `{command}`, {time.strftime('%Y-%m-%d %H:%M')}.", "", text, "",
            "The largest ops of each run (seconds):", "",
            *[f"- {'diffusers' if r['library'] == 'diffusers' else 'ours, ' + r['backend']}: "
              + ", ".join(f"`{name}` {s:.2f}" for name, s in r["top_ops"]) for r in runs]])
        write_between_markers(Path(args.write), "sd-profile-sd15", block,
                              "Stable Diffusion checkpoints")


if __name__ == "__main__":
    main()
