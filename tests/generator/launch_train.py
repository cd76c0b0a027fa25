"""Test launcher: run `liftavatar` commands one after another in one launched process group, and under
an FSDP accelerate config on CPU processes, run accelerate's FSDP2 path over gloo.

    torchrun --nproc_per_node 2 tests/generator/launch_train.py train ... ::: train ... --resume
    accelerate launch --config_file configs/accelerate/fsdp_14b.yaml --num_processes 2 \\
        tests/generator/launch_train.py train --device cpu --mixed-precision no ...

Several commands per launch (separated by ``:::``) spare the tests a process-group start-up each
(imports dominate a tiny run on 2 cores).

FSDP on CPU: torch 2.13's FSDP2 (``fully_shard``, DTensor, ``torch.distributed.checkpoint``) runs on CPU
over gloo, but accelerate 1.15 switches to FSDP only on accelerator devices — ``AcceleratorState.__init__``
sets ``DistributedType.FSDP`` inside its MULTI_GPU / MULTI_XPU / … branch and never for MULTI_CPU, so on a
CPU the FSDP plugin that ``accelerate launch`` builds from the config is silently dropped and training
runs as DDP. This launcher does, for MULTI_CPU, what accelerate does for GPUs (adopt the plugin, set the
distributed type to FSDP, hand it the mixed precision) and nothing else; everything after that —
``Accelerator.prepare``'s FSDP2 path (activation checkpointing, ``fully_shard`` per WanTransformerBlock,
``cpu_ram_efficient_loading``'s broadcast from rank 0), gradient clipping, and train()'s own FSDP code —
is the code a GPU run executes.
"""

from __future__ import annotations

import sys

import accelerate.state as accelerate_state
from accelerate.utils import DistributedType

_original_init = accelerate_state.AcceleratorState.__init__


def _init(self, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate_state.AcceleratorState.__init__ = _init


def main(argv: list[str]) -> int:
    from liftavatar.cli import main as cli

    commands, current = [], []
    for arg in argv:
        if arg == ":::":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for command in commands:
        code = cli(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    from liftavatar.generator.train import exit_process

    exit_process(main(sys.argv[1:]))
