"""The [data] section reaches the token loader: a static mixture from TOML and the command line."""

import pytest

from titan_rw import config as C
from titan_rw.data import EMBEDDED_TRAIN

CFG = "train_configs/debug_cpu.toml"


def test_mixture_from_command_line_reaches_the_loader():
    wiki, fortunes = f"{EMBEDDED_TRAIN}/wikipedia.parquet", f"{EMBEDDED_TRAIN}/fortunes.parquet"
    cfg = C.from_args(CFG, [f'--data.datasets=["{wiki}", "{fortunes}"]', "--data.weights=[0.7, 0.3]",
                            "--data.format", "parquet", "--data.shuffle", "false"], world_size=1)
    dl = cfg.dataloader
    assert list(dl.datasets) == [wiki, fortunes]
    assert list(dl.weights) == [0.7, 0.3]
    assert dl.format == "parquet" and dl.shuffle is False


def test_bad_data_values_are_rejected_naming_the_key():
    with pytest.raises(C.ConfigError, match="data.format"):
        C.from_args(CFG, ["--data.format", "csv"], world_size=1)
