"""The compiled kernels use no approximate instructions.

rsqrt14/rcp14 (AVX-512), rsqrtps/rcpps (SSE/AVX), rsqrt28/rcp28 (AVX-512ER) and their
fp16/bf16 cousins return estimates whose bits the ISA leaves to the vendor: an AMD and an
Intel CPU give different results, so the kernels' output (and its error against the
reference) would depend on whose CPU runs them. Every kernel uses IEEE sqrt and division.
"""
import re
import shutil
import subprocess

import pytest

# Mnemonics of every x86 approximate reciprocal / reciprocal-sqrt instruction
# (scalar and packed, any vector width or element type).
APPROXIMATE = re.compile(r"^v?(rsqrt|rcp)(14|28)?(ps|ss|pd|sd|ph|sh|pbf16|bf16)?$")


def _module_file():
    from lopt_ext import _ffi
    return _ffi._cpu_module().__file__


def approximate_instructions(path):
    """{mnemonic: count} of approximate instructions in the disassembly of ``path``."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], check=True,
                         capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        if APPROXIMATE.match(mnemonic):
            found[mnemonic] = found.get(mnemonic, 0) + 1
    return found


def test_pattern_catches_the_instructions_it_names():
    for m in ("vrsqrt14ps", "vrcp14ps", "rsqrtps", "rcpss", "vrsqrtps", "vrsqrt28ps", "vrcpph",
              "vrsqrt14sd"):
        assert APPROXIMATE.match(m), m
    for m in ("vsqrtps", "vdivps", "sqrtss", "vfmadd231ps", "rcr", "vrcpcast"):
        assert not APPROXIMATE.match(m), m


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_cpu_module_has_no_approximate_instructions():
    path = _module_file()
    found = approximate_instructions(path)
    assert not found, f"{path} contains approximate instructions {found}: use IEEE sqrt/division"
    # the scan itself sees the module's vector code (the sqrt/div it uses instead)
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], check=True,
                         capture_output=True, text=True).stdout
    assert re.search(r"\tv?sqrtps\b", out), "no sqrtps found: is this the kernel module?"
