"""Where a training step's time goes: the reference UNet's building blocks,
forward and backward, timed in TensorFlow, JAX and PyTorch directly (no
Keras), each in its own subprocess.

    python benchmarks/ops.py                 # this CPU as it is
    python benchmarks/ops.py --isa avx2      # AVX2 only: an AMD EPYC's kernels on a Xeon

`--isa avx2` caps the instruction set each framework's CPU kernels may use
(`ONEDNN_MAX_CPU_ISA` for oneDNN, which TensorFlow and PyTorch use for
convolutions; `--xla_cpu_max_isa` for XLA; `ATEN_CPU_CAPABILITY` for
PyTorch's own kernels), so a Xeon with AVX-512 and AMX runs the code paths
an AVX2-only CPU runs. One thing no cap hides is the CPU's features, by
which TensorFlow decides whether to use oneDNN at all: on an AVX2-only CPU
its default is off, which keras_diffusion overrides (it sets
`TF_ENABLE_ONEDNN_OPTS=1` unless told otherwise); prefix
`TF_ENABLE_ONEDNN_OPTS=0` to time TensorFlow's own default there. The ops,
on the shapes of the reference UNet
(docs/performance.md) at batch 32:

- `conv3x3`: 3x3 convolution 64 -> 64 channels on 28x28, plus bias;
- `conv3x3_wide`: 3x3 convolution 128 -> 128 on 7x7;
- `groupnorm_silu`: GroupNorm (8 groups) and SiLU on 28x28x64;
- `attention`: one head of self-attention over the 49 positions of 7x7x128;
- `dense`: a 128 -> 512 matmul on the time embedding.

JAX runs twice: `jax` with XLA's convolutions on its Eigen kernels, as
keras_diffusion sets it (`keras_diffusion._XLA_CPU_FLAGS`),
and `jax-ynnpack` on YNNPACK, XLA's own default in jaxlib 0.10.

Each is timed as a compiled function (`tf.function`, `jax.jit`; PyTorch
eager, as its training runs) computing the gradient of the sum of the output
with respect to the input and the weights: milliseconds per call, median of
`--repeats`. For TensorFlow it also times GroupNorm + SiLU written with a
hand-written gradient and compiled by XLA on its own (`_tensorflow_group_norms`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

BATCH = 32
OPS = ("conv3x3", "conv3x3_wide", "groupnorm_silu", "attention", "dense")
SHAPES = {  # input NHWC (or N, L, C), weight shape
    "conv3x3": ((BATCH, 28, 28, 64), (3, 3, 64, 64)),
    "conv3x3_wide": ((BATCH, 7, 7, 128), (3, 3, 128, 128)),
    "groupnorm_silu": ((BATCH, 28, 28, 64), (64,)),
    "attention": ((BATCH, 49, 128), (128, 384)),
    "dense": ((BATCH, 128), (128, 512)),
}
GROUPS = 8


def _median_ms(fn, repeats):
    fn()  # compile / warm up
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def _data(op):
    import numpy as np

    rng = np.random.default_rng(0)
    x_shape, w_shape = SHAPES[op]
    return (rng.normal(size=x_shape).astype("float32"),
            (rng.normal(size=w_shape) * 0.05).astype("float32"))


# ------------------------------------------------------------------ workers
def run_tensorflow(repeats):
    import tensorflow as tf

    def forward(op, x, w):
        if op.startswith("conv"):
            return tf.nn.conv2d(x, w, 1, "SAME") + 0.1
        if op == "groupnorm_silu":
            n, h, wd, c = x.shape
            g = tf.reshape(x, (n, h, wd, GROUPS, c // GROUPS))
            mean, var = tf.nn.moments(g, axes=(1, 2, 4), keepdims=True)
            y = tf.reshape((g - mean) * tf.math.rsqrt(var + 1e-5), x.shape) * w
            return tf.nn.silu(y)
        if op == "attention":
            q, k, v = tf.split(x @ w, 3, axis=-1)
            a = tf.nn.softmax(q @ tf.transpose(k, (0, 2, 1)) / 128**0.5)
            return a @ v
        return x @ w

    results = {}
    for op in OPS:
        x, w = (tf.constant(a) for a in _data(op))

        @tf.function
        def step(x=x, w=w, op=op):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = tf.reduce_sum(forward(op, x, w))
            return tape.gradient(y, [x, w])

        results[op] = _median_ms(lambda: [g.numpy() for g in step()], repeats)
    results.update(_tensorflow_group_norms(tf, repeats))
    return results


def _tensorflow_group_norms(tf, repeats):
    """GroupNorm + SiLU in TensorFlow three ways, the ways this library could
    write it without a C++ kernel: as composed ops (what Keras runs), with a
    hand-written gradient (`tf.custom_gradient`: two reductions and a few
    elementwise passes backward, instead of autodiff's graph), and as a
    `jit_compile` function, which XLA fuses while the convolutions around it
    stay on oneDNN."""
    x, w = (tf.constant(a) for a in _data("groupnorm_silu"))
    eps = 1e-5

    def grouped(x):
        n, h, wd, c = x.shape
        return tf.reshape(x, (n, h * wd, GROUPS, c // GROUPS))

    def composed(x, w):
        g = grouped(x)
        mean, var = tf.nn.moments(g, axes=(1, 3), keepdims=True)
        return tf.nn.silu(tf.reshape((g - mean) * tf.math.rsqrt(var + eps), x.shape) * w)

    @tf.custom_gradient
    def normalized(x, w):
        g = grouped(x)
        mean, var = tf.nn.moments(g, axes=(1, 3), keepdims=True)
        r = tf.math.rsqrt(var + eps)
        x_hat = (g - mean) * r

        def grad(dy):
            dw = tf.reduce_sum(dy * tf.reshape(x_hat, x.shape), axis=(0, 1, 2))
            dg = grouped(dy * w)
            dx = r * (dg - tf.reduce_mean(dg, axis=(1, 3), keepdims=True)
                      - x_hat * tf.reduce_mean(dg * x_hat, axis=(1, 3), keepdims=True))
            return tf.reshape(dx, x.shape), dw
        return tf.reshape(x_hat, x.shape) * w, grad

    variants = {
        "groupnorm_silu (TF composed)": composed,
        "groupnorm_silu (TF custom gradient)": lambda x, w: tf.nn.silu(normalized(x, w)),
        "groupnorm_silu (TF XLA-fused)": tf.function(composed, jit_compile=True),
    }
    results = {}
    for name, forward in variants.items():
        @tf.function
        def step(forward=forward):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = tf.reduce_sum(forward(x, w))
            return tape.gradient(y, [x, w])

        results[name] = _median_ms(lambda: [g.numpy() for g in step()], repeats)
    return results


def run_jax(repeats):
    import jax
    import jax.numpy as jnp

    def forward(op, x, w):
        if op.startswith("conv"):
            return jax.lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + 0.1
        if op == "groupnorm_silu":
            n, h, wd, c = x.shape
            g = x.reshape(n, h, wd, GROUPS, c // GROUPS)
            mean = g.mean(axis=(1, 2, 4), keepdims=True)
            var = g.var(axis=(1, 2, 4), keepdims=True)
            y = ((g - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape) * w
            return jax.nn.silu(y)
        if op == "attention":
            q, k, v = jnp.split(x @ w, 3, axis=-1)
            a = jax.nn.softmax(q @ k.transpose(0, 2, 1) / 128**0.5)
            return a @ v
        return x @ w

    results = {}
    for op in OPS:
        x, w = (jnp.asarray(a) for a in _data(op))
        step = jax.jit(jax.grad(lambda x, w, op=op: forward(op, x, w).sum(), argnums=(0, 1)))
        results[op] = _median_ms(lambda: jax.block_until_ready(step(x, w)), repeats)
    return results


def run_torch(repeats):
    import torch
    import torch.nn.functional as F

    def forward(op, x, w):
        if op.startswith("conv"):
            return F.conv2d(x, w, padding=1) + 0.1
        if op == "groupnorm_silu":
            return F.silu(F.group_norm(x, GROUPS, w))
        if op == "attention":
            q, k, v = (x @ w).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v)
        return x @ w

    results = {}
    for op in OPS:
        x, w = _data(op)
        if op.startswith("conv"):  # NCHW, OIHW; channels-last memory as our backend runs it
            x = torch.tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            w = torch.tensor(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        elif op == "groupnorm_silu":
            x = torch.tensor(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            w = torch.tensor(w)
        else:
            x, w = torch.tensor(x), torch.tensor(w)
        x.requires_grad_(True)
        w.requires_grad_(True)

        def step(x=x, w=w, op=op):
            x.grad = w.grad = None
            forward(op, x, w).sum().backward()

        results[op] = _median_ms(step, repeats)
    return results


WORKERS = {"tensorflow": run_tensorflow, "jax": run_jax, "jax-ynnpack": run_jax, "torch": run_torch}
# XLA's convolution kernels: "jax" runs them where keras_diffusion puts them
# (Eigen, on every core), "jax-ynnpack" where XLA itself would (YNNPACK).
XLA_CONVOLUTIONS = {"jax": "-individual_convolution", "jax-ynnpack": "individual_convolution"}


# ------------------------------------------------------------------- driver
def isa_environment(isa):
    """The variables that cap each framework's CPU kernels at `isa`."""
    if isa == "native":
        return {}
    return {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_cpu_max_isa=AVX2"])),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--frameworks", default="tensorflow,jax,jax-ynnpack,torch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args.repeats)))
        return 0
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **isa_environment(args.isa))
    table = {}
    for framework in args.frameworks.split(","):
        worker_env = dict(env)
        if framework in XLA_CONVOLUTIONS:
            worker_env["XLA_FLAGS"] = " ".join(filter(None, [
                env.get("XLA_FLAGS"),
                f"--xla_cpu_experimental_ynn_fusion_type={XLA_CONVOLUTIONS[framework]}"]))
        out = subprocess.run([sys.executable, __file__, "--worker", framework, "--repeats",
                              str(args.repeats)], env=worker_env, capture_output=True, text=True)
        line = [row for row in out.stdout.splitlines() if row.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{framework} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        table[framework] = json.loads(line[0][len("RESULT "):])
    frameworks = list(table)
    print(f"ISA: {args.isa}; ms per forward+backward, batch {BATCH}, median of {args.repeats}")
    print("| op | " + " | ".join(frameworks) + " |")
    print("|---|" + "---|" * len(frameworks))
    for op in OPS:
        print(f"| {op} | " + " | ".join(f"{table[f][op]:.2f}" for f in frameworks) + " |")
    extra = {op: ms for op, ms in table.get("tensorflow", {}).items() if op not in OPS}
    if extra:
        print("TensorFlow's GroupNorm + SiLU written three ways (ms): "
              + "; ".join(f"{op.split('(TF ')[1][:-1]} {ms:.2f}" for op, ms in extra.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
