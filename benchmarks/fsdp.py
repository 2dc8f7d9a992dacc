"""Stable Diffusion at real size (random weights) with its weights sharded over
devices (`distribute: fsdp`, JAX): the weight bytes each device holds against
the whole model's.

    python benchmarks/fsdp.py --write docs/stable_diffusion.md

The devices are `--devices` virtual CPU devices (XLA's
`--xla_force_host_platform_device_count`), so this checks the sharding at
full size, not the speed of real accelerators: every device shares this
machine's memory and cores. The random SD 1.5 pipeline is the one
`benchmarks/stable_diffusion.py` builds (`--folder`, kept for later runs).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import write_between_markers  # noqa: E402
from stable_diffusion import ROOT  # noqa: E402
from stable_diffusion import write_random_pipeline  # noqa: E402
from throughput import hardware  # noqa: E402


def worker(folder, dtype):
    import keras

    import keras_diffusion as kd
    from keras_diffusion.distribute import distribution_scope

    with distribution_scope("fsdp") as devices:
        start = time.perf_counter()
        model = kd.load_model(folder, dtype=dtype)
        load = time.perf_counter() - start
        report = {"devices": devices, "dtype": dtype, "load_s": round(load, 1), "parts": {}}
        for name, part in (("unet", model.network), ("vae", model.autoencoder),
                           ("text_encoder", model.text_encoder)):
            held, whole, split = {}, 0, 0
            for variable in part.variables:
                value = variable.value
                whole += value.nbytes
                split += value.nbytes if len(value.sharding.device_set) > 1 and \
                    value.sharding.shard_shape(value.shape) != value.shape else 0
                for shard in value.addressable_shards:
                    held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
            report["parts"][name] = {"whole_bytes": whole, "sharded_bytes": split,
                                     "most_on_one_device": max(held.values()),
                                     "least_on_one_device": min(held.values())}
    report["backend"] = keras.backend.backend()
    return report


def table(report):
    rows = ["| part | whole model GB | share of it sharded | largest per-device GB | "
            "per device / whole |", "|---|---|---|---|---|"]
    total = {"whole_bytes": 0, "sharded_bytes": 0, "most_on_one_device": 0}
    for name, part in report["parts"].items():
        for key in total:
            total[key] += part[key]
        rows.append(_row(name, part))
    rows.append(_row("all", total))
    return "\n".join(rows)


def _row(name, part):
    gb = 2**30
    return (f"| {name} | {part['whole_bytes'] / gb:.2f} | "
            f"{part['sharded_bytes'] / part['whole_bytes']:.1%} | "
            f"{part['most_on_one_device'] / gb:.3f} | "
            f"{part['most_on_one_device'] / part['whole_bytes']:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--folder", type=Path, default=ROOT / "build" / "sd-sd15")
    parser.add_argument("--write", help="put the table into this Markdown file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("REPORT " + json.dumps(worker(args.folder, args.dtype)))
        return
    write_random_pipeline("sd15", args.folder)
    flags = f"--xla_force_host_platform_device_count={args.devices}"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS"), flags])))
    done = subprocess.run([sys.executable, __file__, "--worker", "--folder", str(args.folder),
                           "--dtype", args.dtype], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"the worker failed (exit {done.returncode})")
    report = json.loads(lines[-1][len("REPORT "):])
    text = table(report)
    print(text)
    if args.write:
        command = "python benchmarks/fsdp.py " + " ".join(sys.argv[1:])
        block = "\n".join([
            f"#### {hardware()}, SD 1.5 sharded over {args.devices} virtual devices, "
            f"{args.dtype}", "",
            f"Measured with `{command}`, {time.strftime('%Y-%m-%d %H:%M')}; load (folder to "
            f"sharded model) {report['load_s']} s.", "", text, "", "```", json.dumps(report),
            "```"])
        write_between_markers(Path(args.write), f"sd-fsdp-{args.dtype}", block,
                              "Stable Diffusion checkpoints")


if __name__ == "__main__":
    main()
