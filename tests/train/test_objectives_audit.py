"""Audit of the training objectives, the validation and the run log (metrics.csv)."""

from __future__ import annotations

import pytest
import torch

from eegfast.models import create_model
from eegfast.train.objectives import StepContext, masked_step, tokenizer_step
from eegfast.train.runlog import RunLogger, read_metrics


def test_per_token_outputs_of_a_one_patch_batch_are_not_logged_as_metrics():
    """A batch of one window of one electrode and one patch: the tokenizer's (1, 1) ``indices``
    and the pretraining model's (1, 1) ``mask`` have one element; they were taken for scalars
    and logged (``train/indices``, ``val/mask``) for such batches only."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    tokenizer = create_model("vqnsp_tiny")
    batch = {"x": torch.randn(1, 1, 1, 200), "input_chans": torch.arange(2)}
    out = tokenizer_step(tokenizer, batch, StepContext(cpu))
    assert "indices" not in out.metrics
    assert {"commitment_loss", "amplitude_loss", "phase_loss"} <= set(out.metrics)
    assert all(v.dim() == 0 for v in out.metrics.values())

    model = create_model("labram_tiny_pretrain")
    ctx = StepContext(cpu, tokenizer=tokenizer.eval())
    out = masked_step(model, {**batch, "index": torch.tensor([0])}, ctx)
    assert "mask" not in out.metrics
    assert {"accuracy", "loss_masked", "loss_complement"} <= set(out.metrics)
    assert all(v.dim() == 0 for v in out.metrics.values())


# --- metrics.csv after an interrupted write ----------------------------------------------------

ROWS = "step,tag,value\r\n10,train/loss,1.5\r\n20,train/loss,1\r\n"


@pytest.mark.parametrize(
    "tail",
    [
        "3",  # "30,train/loss,..." cut after its first digit: the next row went on its line
        "\x00" * 16,  # the zeros a file system may leave after a power loss: resume failed
        "30,train/loss,0.5\r\n3x",
    ],
    ids=["cut-step", "zeros", "cut-row"],
)
def test_a_resume_sets_aside_the_rows_of_a_cut_write(tmp_path, tail):
    """The rows after the last checkpoint are not synced: a crash can leave them cut short or
    as zeros. The resumed run's rows follow the rows up to its checkpoint's step, intact."""
    path = tmp_path / "metrics.csv"
    path.write_bytes((ROWS + tail).encode())
    logger = RunLogger(tmp_path, tensorboard=False, resume_step=20)
    logger.log(21, {"train/loss": 0.5})
    logger.close()
    assert read_metrics(path) == {"train/loss": [(10, 1.5), (20, 1.0), (21, 0.5)]}
    assert path.read_text().splitlines()[0] == "step,tag,value"


def test_a_resume_puts_the_header_back_in_a_file_without_it(tmp_path):
    """An older eegfast appended rows to an empty metrics.csv without the header; resumed, the
    file kept its first row as the header and read_metrics failed with KeyError 'tag'."""
    path = tmp_path / "metrics.csv"
    path.write_text("10,train/loss,1.5\r\n20,train/loss,1\r\n", newline="")
    logger = RunLogger(tmp_path, tensorboard=False, resume_step=20)
    logger.log(21, {"train/loss": 0.5})
    logger.close()
    assert read_metrics(path) == {"train/loss": [(10, 1.5), (20, 1.0), (21, 0.5)]}


def test_read_metrics_leaves_out_a_cut_last_row_and_names_a_file_that_does_not_read(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(ROWS + "30,train/lo", newline="")  # a run killed while it wrote
    assert read_metrics(path) == {"train/loss": [(10, 1.5), (20, 1.0)]}
    other = tmp_path / "other.csv"
    other.write_text("a,b\r\n1,2\r\n", newline="")
    with pytest.raises(ValueError, match=r"other\.csv: 2 row\(s\) are not step,tag,value"):
        read_metrics(other)
