"""Python paths that run only when the device is CUDA, checked on a CPU: the device is a
stand-in (``meta``, or a ``cuda`` device whose copies are stubbed) and the few calls that need
a driver are patched, so that what the code asks of torch there runs here.

- evaluation batches (validation, predictions, the tokenizer's codebook summary) are built in
  pinned memory on a GPU, as training's;
- a training step makes no blocking host-to-device copy (each one makes the host wait for
  the GPU's queue);
- ``train.precision=auto`` picks bf16 only where the GPU computes in it, fp16 (with loss
  scaling) on older GPUs; ``eegfast doctor`` says so per GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eegfast.data import ShardDataset
from eegfast.train import finetune
from eegfast.train.data import load_data
from eegfast.train.engine import resolve_precision
from eegfast.train.objectives import StepContext, TargetCache, classification_step
from eegfast.train.objectives import tokenizer_codes as targets_of
from eegfast.train.validation import Validator
from tests.train._sample import two_prepared_folders
from tests.train.fakes import SyntheticEEG, TinyClassifier, TinyTokenizer, collate

CUDA = torch.device("cuda")
META = torch.device("meta")  # a device that is not the host, for the copies' arguments


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return two_prepared_folders(tmp_path_factory.mktemp("cudapaths"), 12.0, 2)


@pytest.fixture
def pin_requests(monkeypatch):
    """The ``pin_memory`` of every ``ShardDataset.get_batch`` call; the batch is built in
    ordinary memory (a CPU-only torch cannot pin)."""
    requests: list[bool] = []
    original = ShardDataset.get_batch

    def get_batch(self, indices, *, pin_memory=False, keep_order=False):
        requests.append(pin_memory)
        return original(self, indices, keep_order=keep_order)

    monkeypatch.setattr(ShardDataset, "get_batch", get_batch)
    return requests


def _host_evaluate(model, batch):
    return batch["x"].double().mean(), {}, None


@pytest.mark.parametrize("device", [CUDA, torch.device("cpu")], ids=["cuda", "cpu"])
def test_evaluation_batches_are_pinned_on_a_gpu_as_training_batches(
    folders, pin_requests, monkeypatch, device
):
    """Validation at checkpoints, finetune/evaluate/predict's predictions and the tokenizer's
    codebook summary read whole batches of prepared folders; on a GPU they were built in
    ordinary memory, which to_device then copied once more into pinned memory before each
    asynchronous copy (fit's own batches are built pinned). Never pinned on a CPU device."""
    from eegfast.models import create_model
    from eegfast.train.commands import tokenizer as tokenizer_command

    data = load_data(folders)
    wanted = device.type == "cuda"
    validator = Validator(
        data, list(range(0, len(data), 3)), _host_evaluate, device=device, precision="fp32"
    )
    validator._run(torch.nn.Identity())
    assert pin_requests and all(pin is wanted for pin in pin_requests)

    pin_requests.clear()
    on_host = lambda batch, device: batch  # noqa: E731 - the batch stays where the test runs
    monkeypatch.setattr(finetune, "to_device", on_host)
    arith = [i for i, item in enumerate(data.items) if item.task == "arith"]
    model = TinyClassifier().eval()
    feats, _ = finetune.predict(
        model, data, arith, "arith", device, task_id=None, batch_size=4, features=True
    )
    assert feats.shape == (len(arith), 16)
    assert pin_requests and all(pin is wanted for pin in pin_requests)

    pin_requests.clear()
    monkeypatch.setattr(tokenizer_command, "to_device", on_host)
    tokenizer = create_model("vqnsp_tiny")
    assert "codes" in tokenizer_command.codebook_summary(tokenizer, data, device, max_windows=6)
    assert pin_requests and all(pin is wanted for pin in pin_requests)


class BlockingUploads(TorchDispatchMode):
    """Records the host-to-device copies made without ``non_blocking``: on a GPU each makes
    the host wait until the device has run everything queued before it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            target = kwargs.get("device")
            if (
                args[0].device.type == "cpu"
                and target is not None
                and torch.device(target).type != "cpu"
                and not kwargs.get("non_blocking", False)
            ):
                self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)

    @classmethod
    def watching(cls, monkeypatch) -> BlockingUploads:
        """A mode that also records ``torch.tensor(data, device=<not the host>)``, whose copy
        to the device a dispatch mode does not see (it runs below it, and blocks)."""
        mode, real = cls(), torch.tensor

        def tensor(data, *args, device=None, **kwargs):
            if device is not None and torch.device(device).type != "cpu":
                mode.shapes.append(tuple(real(data).shape))
            return real(data, *args, device=device, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)
        return mode


def test_class_weighted_fine_tuning_step_does_not_wait_for_the_gpu(monkeypatch):
    """classification_step moved the task's class weights (kept on the host, where the
    normaliser hook reads them) with a plain ``.to(device)``: a blocking copy from pageable
    memory, so fine-tuning waited for the GPU at every step."""
    batch = collate([SyntheticEEG(4, channels=(3,))[i] for i in range(4)])
    ctx = StepContext(META, class_weights={"mi": torch.tensor([1.0, 3.0])})
    model = TinyClassifier().to(META)
    with BlockingUploads.watching(monkeypatch) as uploads:
        out = classification_step(model, batch, ctx)
    assert out.loss.device == META
    assert uploads.shapes == []


def test_partly_cached_tokenizer_targets_do_not_wait_for_the_gpu(monkeypatch):
    """Once the target cache is full most batches hold a few windows it left out among cached
    ones; the rows of each kind were made with ``torch.tensor(rows, device=...)``, two
    blocking copies a step."""
    batch = collate([SyntheticEEG(4, channels=(3,))[i] for i in range(4)])
    batch["index"] = torch.arange(4)
    x = batch["x"]
    cache = TargetCache(16)
    cache.put([0, 2], torch.zeros(2, x.shape[1] * x.shape[2], dtype=torch.long))
    cache.put = lambda indices, codes: None  # (a meta tensor has no values to keep)
    ctx = StepContext(META, tokenizer=TinyTokenizer().to(META), target_cache=cache)
    on_device = {k: v.to(META) if torch.is_tensor(v) else v for k, v in batch.items()}
    with BlockingUploads.watching(monkeypatch) as uploads:
        codes = targets_of(ctx, batch, on_device["x"], on_device["input_chans"])
    assert codes.shape == (4, x.shape[1] * x.shape[2]) and codes.device == META
    assert cache.misses == 1 and uploads.shapes == []


@pytest.mark.parametrize(
    ("capability", "hip", "wanted"),
    [
        ((7, 0), None, torch.float16),  # V100
        ((7, 5), None, torch.float16),  # T4
        ((8, 0), None, torch.bfloat16),  # A100
        ((9, 0), None, torch.bfloat16),  # H100
        ((9, 4), "6.2", torch.bfloat16),  # ROCm: bf16 on its GPUs
    ],
)
def test_auto_precision_is_bf16_only_where_the_gpu_computes_in_it(
    monkeypatch, capability, hip, wanted
):
    """``auto`` gave bf16 on every GPU: on a V100 or T4 (no bf16 arithmetic) that runs
    emulated where it runs at all, where fp16 with the GradScaler uses their tensor cores."""
    asked: list[torch.device] = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert resolve_precision("auto", torch.device("cuda", 1)) == wanted
    assert hip or asked == [torch.device("cuda", 1)]  # this process's GPU, not the current one
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    # an explicit choice is kept
    assert resolve_precision("bf16", torch.device("cuda", 1)) == torch.bfloat16


def test_doctor_reports_bf16_and_the_default_precision_per_gpu(monkeypatch):
    """``eegfast doctor`` said "bf16 yes" for every GPU from torch.cuda.is_bf16_supported()
    (the current GPU's, and yes where bf16 is only emulated) and "bf16 autocast" as the
    default precision on any GPU."""
    import eegfast.ops
    from eegfast.train.commands import doctor

    gpus = [("Tesla V100-SXM2-16GB", 7, 0), ("NVIDIA H100 80GB HBM3", 9, 0)]
    monkeypatch.setattr(eegfast.ops, "available_backends", lambda: {})  # (cached: left alone)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)

    def properties(i):
        name, major, minor = gpus[i]
        return SimpleNamespace(name=name, major=major, minor=minor, total_memory=16 * 2**30)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d=None: gpus[torch.device(d).index][1:]
    )
    report = doctor.collect()
    assert [d["bf16"] for d in report["cuda"]["devices"]] == [False, True]
    assert report["precision_default"] == "fp16 autocast with loss scaling"  # cuda:0's
    text = doctor.format_text(report)
    assert "sm_70, 16.0 GiB, bf16 no" in text and "sm_90, 16.0 GiB, bf16 yes" in text
    gpus.reverse()
    assert doctor.collect()["precision_default"] == "bf16 autocast"


def test_generate_names_a_gpu_index_past_the_visible_ones(monkeypatch, tmp_path, capsys):
    """``eegfast generate --device cuda:1`` on a one-GPU machine went on to move the model
    there: CUDA's "invalid device ordinal" traceback. One line naming --device now."""
    from eegfast import cli
    from eegfast.train.commands import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    loads: list = []
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: loads.append(k) or 1 / 0)
    argv = ["generate", "--model", "m", "--prompt", "p.edf", "--seconds", "1"]
    out = str(tmp_path / "x.npy")
    assert cli.main([*argv, "--out", out, "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "eegfast generate: error: --device cuda:1: this machine has 1 visible GPU(s) "
        "(cuda:0 to cuda:0)\n"
    )
    assert loads == []
    assert generate._device("cuda:0") == torch.device("cuda", 0)
    assert generate._device("cuda") == torch.device("cuda")


def test_host_copies_wait_on_the_stream_of_the_tensors_gpu(monkeypatch):
    """HostCopies (the target cache's codes, fit's non-finite flags) recorded each copy's
    event on the current device's stream: for a model on cuda:1 with device 0 current (fit
    given ``cuda:1`` in a notebook) the event completed at once, and the cache filed codes
    from pinned memory the copy had not yet filled."""
    from eegfast.train.objectives import HostCopies

    recorded: list = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self):
            return True

    class OnGpu:  # what HostCopies asks of a CUDA tensor
        device = torch.device("cuda", 1)

        def to(self, device, non_blocking=False):
            assert device == "cpu" and non_blocking
            return torch.zeros(2)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    copies = HostCopies()
    copies.add(OnGpu(), "codes")
    assert recorded == [("stream of", torch.device("cuda", 1))]
    assert [tag for tag, _ in copies.arrived()] == ["codes"]
