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


def test_the_op_profile_sorts_ops_into_kinds(monkeypatch):
    """benchmarks/sd_profile.py: op names of the three frameworks land in
    the same kinds, and an XLA fusion is a convolution or a matmul by what
    its computation holds."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import sd_profile

    try:
        kinds = {name: sd_profile.kind_of(name) for name in (
            "aten::mkldnn_convolution", "_MklNativeFusedConv2D", "aten::addmm", "_MklEinsum",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::copy_",
            "transpose_copy_fusion", "aten::native_group_norm", "aten::silu")}
        assert kinds == {
            "aten::mkldnn_convolution": "convolution", "_MklNativeFusedConv2D": "convolution",
            "aten::addmm": "matmul", "_MklEinsum": "matmul",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
            "aten::copy_": "layout copy", "transpose_copy_fusion": "layout copy",
            "aten::native_group_norm": "normalisation", "aten::silu": "other"}
        hlo = "\n".join([
            "%fused_computation.1 (p0: f32[2,8,8,4], p1: f32[3,3,4,4]) -> f32[2,8,8,4] {",
            "  %c = f32[2,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}",
            "}",
            "%fused_computation.2 (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {",
            "  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1)",
            "}",
            "ENTRY %main (x: f32[2,8,8,4]) -> f32[4,4] {",
            "  %ynn_fusion = f32[2,8,8,4]{3,2,1,0} fusion(%x, %w), kind=kCustom, "
            "calls=%fused_computation.1",
            "  ROOT %ynn_fusion.1 = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, "
            "calls=%fused_computation.2",
            "}"])
        assert sd_profile._hlo_kinds(hlo) == {"ynn_fusion": "convolution",
                                              "ynn_fusion.1": "matmul"}
        run = dict(library="keras_diffusion", backend="jax", wall_s=2.5,
                   kinds={"convolution": 1.25, "matmul": 0.5})
        table = sd_profile.table([run]).splitlines()
        assert table[0] == "| op kind | ours, jax |"
        assert "| convolution | 1.25 |" in table and "| attention | 0.00 |" in table
        assert table[-1] == "| **step wall time** | **2.50** |"
    finally:
        for name in ("sd_profile", "stable_diffusion", "throughput", "_markdown"):
            sys.modules.pop(name, None)


def test_a_section_is_a_table_of_its_own_after_the_main_one(tmp_path, monkeypatch):
    """benchmarks/stable_diffusion.py --section: another CPU's table goes
    right after the main table of its model and dtype (not after the
    bfloat16 one, whose key starts the same), and a new run of that section
    replaces it alone."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import stable_diffusion

    doc = tmp_path / "sd.md"
    doc.write_text("# SD\n\n<!-- sd-inference-sd15:start -->\nXeon\n<!-- sd-inference-sd15:end -->\n"
                   "\nprose\n\n<!-- sd-inference-sd15-bfloat16:start -->\nbf16\n"
                   "<!-- sd-inference-sd15-bfloat16:end -->\n")
    monkeypatch.setattr(stable_diffusion, "hardware", lambda: "AMD EPYC (AVX2), 2 cores")
    monkeypatch.setattr(sys, "argv", ["stable_diffusion.py", "--section", "zen5"])

    def write(step):
        args = type("Args", (), dict(write=str(doc), section="zen5", model="sd15"))()
        stable_diffusion._write(args, f"| step {step} |", [{"unet_step_s": step}],
                                "sd-inference-sd15", "512x512, 20 steps, float32")

    try:
        write(5.5)
        text = doc.read_text()
        assert text.index("<!-- sd-inference-sd15:end -->") \
            < text.index("<!-- sd-inference-sd15-zen5:start -->") < text.index("prose")
        assert "#### AMD EPYC (AVX2), 2 cores, sd15, 512x512, 20 steps, float32" in text
        assert "`python benchmarks/stable_diffusion.py --section zen5`" in text
        write(6.5)
        again = doc.read_text()
        assert "| step 6.5 |" in again and "| step 5.5 |" not in again
        assert again.count("sd-inference-sd15-zen5:start") == 1

        def outside(page):  # the document less the section's block
            head, rest = page.split("<!-- sd-inference-sd15-zen5:start -->")
            return head, rest.split("<!-- sd-inference-sd15-zen5:end -->")[1]

        assert outside(again) == outside(text)
        with pytest.raises(Exception, match="one word of letters, digits and underscores"):
            stable_diffusion._section("zen 5")
        assert stable_diffusion._section("zen5") == "zen5"
    finally:
        for name in ("stable_diffusion", "throughput", "_markdown"):
            sys.modules.pop(name, None)
