"""FSDP on CPU processes (gloo) for tests/test_strategies.py.

Two refusals stand between Lightning's `FSDPStrategy` and a CPU: Lightning's accelerator connector accepts it
only with a GPU accelerator (an exact-type check, `type(strategy) is FSDPStrategy`), and Lightning wraps the
model with `device_id=root_device.index`, None on a CPU, which torch's FSDP answers with "FSDP needs a non-CPU
accelerator device". This subclass passes the first (it is another type) and gives FSDP `device_id=cpu`; all else
(wrap policy, sharding, state dict type, checkpoint saving and loading) is Lightning's."""

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
