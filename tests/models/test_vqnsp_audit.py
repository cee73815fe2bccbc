"""VQ-NSP tokenizer audit: settings that the quantizer and the ``eegfast tokenizer`` command
must refuse, with the argument named, before any training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eegfast.cli import main as cli
from eegfast.nn import NormEMAVectorQuantizer
from eegfast.train.commands import tokenizer as command
from eegfast.train.config import ConfigError, RunConfig


def test_threshold_of_one_keeps_the_codes_a_batch_uses():
    """At the largest threshold allowed (the count of 1 a restart gives), a code that every
    batch assigns rows to is never re-seeded: the k-means codes on 4 clusters stay put."""
    centers = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    quantizer = NormEMAVectorQuantizer(4, 8, dead_code_threshold=1.0)
    quantizer(centers.repeat(16, 1))  # k-means: one code per cluster
    first = quantizer.codebook.clone()
    for _ in range(20):
        out = quantizer(centers.repeat(16, 1))
        assert not out.indices.lt(0).any()
    torch.testing.assert_close(quantizer.codebook, first)
    assert bool((quantizer.cluster_size > 1.0).all())


def test_vq_dead_code_threshold_above_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"vq.dead_code_threshold.*in \[0, 1\]"):
        RunConfig().with_overrides({"vq.dead_code_threshold": 2.0})
    config = RunConfig().with_overrides({"vq.dead_code_threshold": 1.0})
    assert command.quantizer_kwargs(config) == {"dead_code_threshold": 1.0}


def test_tokenizer_command_refuses_the_threshold_before_loading_data(tmp_path, capsys):
    """The setting is checked before the run folder is claimed and the data are read: the
    data folder here does not exist, and the error names the config key, not the data."""
    out = tmp_path / "tok"
    argv = ["tokenizer", "--data", str(tmp_path / "missing"), "--out", str(out)]
    argv += ["--model", "vqnsp_tiny", "--set", "vq.dead_code_threshold=5", "--no-progress"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "vq.dead_code_threshold" in err and "in [0, 1]" in err
    assert not out.exists()
