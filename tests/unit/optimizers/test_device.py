"""Device probe: CPU flags, GPU listing, fingerprint stability."""

from __future__ import annotations

from optimizers import DeviceInfo
from optimizers.device import parse_cpuinfo, parse_smi
from tests.unit.optimizers.conftest import fake_device

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Test CPU
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Test CPU
flags\t\t: fpu sse sse2
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve\nCPU part\t: 0xd0c\n"


def test_parse_cpuinfo_x86_and_arm() -> None:
    model, flags = parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Test CPU"
    assert flags == ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8")
    assert parse_cpuinfo(ARM)[1] == ("asimd", "asimddp", "sve")


def test_int8_decisions_follow_the_isa() -> None:
    assert fake_device().has_vnni and fake_device().int8_pays
    avx2 = fake_device(cpu_flags=("avx2", "fma"))
    assert not avx2.has_vnni and avx2.int8_pays
    assert not fake_device(cpu_flags=("sse4_2",)).int8_pays
    assert fake_device(arch="aarch64", cpu_flags=("asimd", "asimddp")).int8_pays
    assert fake_device(cpu_flags=("avx2", "amx_int8")).isa_level == "amx"


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = fake_device(), fake_device()
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("x86_64-vnni-2c-nogpu-")
    assert fake_device(cores=4).fingerprint != a.fingerprint
    assert fake_device(providers=("CUDAExecutionProvider", "CPUExecutionProvider")).fingerprint != a.fingerprint
    gpu = fake_device(gpus=[{"name": "NVIDIA H100", "compute_capability": "9.0"}])
    assert "NVIDIA_H100" in gpu.fingerprint


def test_nvidia_smi_parsing() -> None:
    gpus = parse_smi("NVIDIA A100-SXM4-40GB, 8.0, 40960\nNVIDIA L4, 8.9, 23034\n")
    assert [(g.name, g.compute_capability, g.memory_mb) for g in gpus] == [
        ("NVIDIA A100-SXM4-40GB", "8.0", 40960),
        ("NVIDIA L4", "8.9", 23034),
    ]


def test_probe_this_machine(device: DeviceInfo) -> None:
    assert device.cores >= 1 and "CPUExecutionProvider" in device.providers
    assert device.onnxruntime_version
    summary = device.summary()
    assert summary["fingerprint"] == device.fingerprint
