"""mlc.accel: devices and precisions resolved from config names (probes monkeypatched), and
what each precision does to a forward pass on the CPU; CUDA tests skip without a GPU."""

import json

import pytest
import torch

from mlc import accel
from mlc.accel import DeviceError, Precision, resolve_device, resolve_precision
from mlc.config import ConfigError, load_config
from mlc.models import create_model

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_cpu_bf16_isa_from_cpuinfo_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert accel.cpu_flags(cpuinfo) >= {"avx2", "avx512_bf16"}
    assert accel.cpu_bf16_isa(accel.cpu_flags(cpuinfo)) == "avx512_bf16"
    assert accel.cpu_bf16_isa({"avx512_bf16", "amx_bf16", "amx_tile"}) == "amx_bf16"
    assert accel.cpu_bf16_isa({"avx2", "avx512f"}) is None
    assert accel.cpu_flags(tmp_path / "missing") == set()


def test_auto_precision_on_a_cpu_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(accel, "CPU_AUTO_BF16", {"amx_bf16": True, "avx512_bf16": False})
    amx = resolve_precision("auto", CPU, {"amx_bf16"})
    assert (amx.name, amx.dtype, str(amx)) == ("bf16", torch.bfloat16, "bf16 (auto: amx_bf16)")
    avx = resolve_precision("auto", CPU, {"avx512_bf16"})
    assert avx.name == "fp32" and avx.dtype is None and "avx512_bf16" in avx.how
    plain = resolve_precision("auto", CPU, {"avx2"})
    assert plain.name == "fp32" and str(plain) == "fp32 (auto: no bf16 instruction set)"
    # Inference on a CPU: fp32 whatever the instruction set (exact whatever the batching).
    inference = resolve_precision("auto", CPU, {"amx_bf16"}, training=False)
    assert inference.name == "fp32" and "inference" in inference.how
    assert resolve_precision("bf16", CPU, {"avx2"}, training=False).name == "bf16"
    # Given names are taken as they are, whatever the CPU.
    assert str(resolve_precision("bf16", CPU, set())) == "bf16"
    assert resolve_precision("fp32", CPU, {"amx_bf16"}).name == "fp32"
    with pytest.raises(DeviceError, match="fp16 runs on CUDA only"):
        resolve_precision("fp16", CPU)
    with pytest.raises(DeviceError, match="precision must be one of"):
        resolve_precision("int8", CPU)


def test_auto_precision_on_cuda_is_bf16_or_fp16_with_a_scaler(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(accel, "cuda_bf16", lambda: True)
    p = resolve_precision("auto", gpu)
    assert (p.name, p.scaled, str(p)) == ("bf16", False, "bf16 (auto: CUDA with bf16)")
    monkeypatch.setattr(accel, "cuda_bf16", lambda: False)
    p = resolve_precision("auto", gpu)
    assert (p.name, p.dtype, p.scaled) == ("fp16", torch.float16, True)
    assert resolve_precision("fp32", gpu).name == "fp32"


def test_device_names_resolve(monkeypatch):
    assert resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("auto", local_rank=3) == CPU
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun's rank
    with pytest.raises(DeviceError, match="LOCAL_RANK=2 has no GPU of its own"):
        resolve_device("auto", local_rank=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="torch sees 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(DeviceError, match="under torchrun"):
        resolve_device("cuda:1", local_rank=0)


def test_config_keys_are_checked():
    config = load_config(None)
    assert (config.train.device, config.train.precision, config.train.compile) == (
        "auto",
        "auto",
        False,
    )
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda or cuda:N"):
        load_config(None, ["train.device=tpu"])
    with pytest.raises(ConfigError, match="train.precision must be auto, fp32, bf16, fp16"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="async mode runs its servers and workers on the CPU"):
        load_config(None, ["train.mode=async", "train.device=cuda"])
    with pytest.raises(ConfigError, match="train.compile: the async mode runs eager"):
        load_config(None, ["train.mode=async", "train.compile=true"])
    assert load_config(None, ["train.mode=async", "train.device=cpu"]).train.mode == "async"


def _conv_output_dtypes(model, x, precision: Precision) -> set:
    seen = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad(), precision.autocast(x.device):
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return seen | {("logits", logits.dtype)}


def test_bf16_autocast_runs_the_convolutions_in_bf16_on_a_cpu():
    torch.manual_seed(0)
    model = create_model("xception-tiny", num_classes=5, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert _conv_output_dtypes(model, x, Precision("bf16")) == {
        torch.bfloat16,
        ("logits", torch.bfloat16),
    }
    assert _conv_output_dtypes(model, x, Precision("fp32")) == {
        torch.float32,
        ("logits", torch.float32),
    }
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


@pytest.mark.cuda
@cuda
def test_auto_on_this_gpu_and_a_channels_last_step_in_its_precision():
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    assert device.type == "cuda"
    assert precision.name == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16")
    torch.manual_seed(0)
    model = create_model("xception-tiny", num_classes=5, width=0.125).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.scaled)
    pixels = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).pin_memory()
    images = pixels.permute(0, 3, 1, 2).to(device, non_blocking=True).float() / 127.5 - 1
    assert images.is_contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(8, 5, device=device) < 0.3).float()
    losses = []
    for _ in range(5):
        with precision.autocast(device):
            logits = model(images)
        assert logits.dtype == precision.dtype
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_predictor_and_mlc_eval_take_a_precision(tiny_checkpoint, mosaics, tmp_path):
    from mlc.cli import main
    from mlc.predict import load

    images = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8)
    fp32 = load(tiny_checkpoint, device="cpu", precision="fp32")
    bf16 = load(tiny_checkpoint, device="cpu", precision="bf16")
    assert "cpu, bf16" in repr(bf16)
    a, b = fp32.logits(images), bf16.logits(images)
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1)
    out = tmp_path / "eval"
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(mosaics), "--quiet"]
    assert main(["eval", *common, "--device", "cpu", "--precision", "bf16", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["device"], summary["precision"]) == ("cpu", "bf16")
    with pytest.raises(SystemExit):  # argparse: not a device name
        main(["eval", *common, "--device", "gpu0"])
