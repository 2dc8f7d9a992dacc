"""The benchmarks' reports: each CPU kind keeps its own throughput table in
docs/performance.md, and a run replaces only its own machine's block."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput

    yield throughput
    sys.modules.pop("throughput", None)


def _run(device, train):
    return [
        {"library": "diffusers", "backend": "torch", "precision": "float32", "params": 3,
         "batch": 64, "train_images_per_s": 50.0, "ddim50_images_per_s": 2.0, "device": device},
        {"library": "keras_diffusion", "backend": "jax", "precision": "float32", "params": 3,
         "batch": 64, "train_images_per_s": train, "ddim50_images_per_s": 2.5,
         "dpmpp10_images_per_s": 10.0, "device": device},
    ]


def test_each_cpu_kind_keeps_its_own_throughput_table(tmp_path, throughput):
    doc = tmp_path / "performance.md"
    head = ("# Performance\n\n## Results\n\n<!-- throughput-gpu:start -->\nA GPU's table\n"
            "<!-- throughput-gpu:end -->")
    doc.write_text(head + "\n\n## What was changed\n\nprose\n")
    xeon, epyc = "Intel Xeon (AVX2, AMX-BF16), 2 cores", "AMD EPYC (AVX2), 2 cores"

    def report(device, train):
        runs = _run(device, train)
        throughput._write_report(doc, throughput.table(runs), "python benchmarks/throughput.py", runs,
                                 "one thread per framework")

    report(xeon, 40.0)  # a new kind goes after the last table, before the prose
    report(epyc, 25.0)
    text = doc.read_text()
    assert text.startswith(head)
    assert text.index(f"#### {xeon}; one thread") < text.index(f"#### {epyc}; one thread") \
        < text.index("## What was changed")
    assert "| 0.80x |" in text and "| 0.50x |" in text  # 40 and 25 against diffusers' 50
    xeon_block = text[text.index("<!-- throughput-intel"):text.index("<!-- throughput-amd")]
    report(epyc, 60.0)  # re-measuring a kind replaces its block and leaves the others
    text = doc.read_text()
    assert text.count(f"#### {epyc}; one thread per framework") == 1 and "| 0.50x |" not in text and "| 1.20x |" in text
    assert xeon_block in text and text.endswith("## What was changed\n\nprose\n")
    raw = [json.loads(line) for line in text.splitlines() if line.startswith('{"library"')]
    assert [r["train_images_per_s"] for r in raw] == [50.0, 40.0, 50.0, 60.0]


def test_an_isa_capped_run_is_its_own_kind(monkeypatch, throughput):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    native = throughput.hardware()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = throughput.hardware()
    assert capped == native + ", kernels capped at AVX2 (--isa avx2)"
    assert throughput._block_key(capped) != throughput._block_key(native)
    assert throughput._block_key("AMD EPYC (AVX2, AVX-512), 2 cores; one thread per framework") == \
        "throughput-amd-epyc-avx2-avx-512-2-cores-one-thread-per-framework"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert throughput.hardware() == capped + ", TensorFlow without oneDNN (TF_ENABLE_ONEDNN_OPTS=0)"
