"""Reading several sites of a frozen language model in one forward pass (the activation cache's harvest).

Each site is a ``HookPoint`` of ``neurolight.datamodules.llm.hooked`` (``resolve_hook_point``): a forward hook on the
module's output, or a pre-hook on its input. The forward stops, by ``StopForward``, as soon as every site has been
read, so no layer after the deepest site runs. A single site read this way is bit-identical to
``HookedLLM.harvest`` (which checks its truncated forward against this hooked one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neurolight.datamodules.llm.hooked import HookPoint, StopForward, module_input


@torch.no_grad()
def capture_sites(model: nn.Module, sites: Sequence[HookPoint], input_ids: Tensor) -> list[Tensor]:
    """The activations of ``sites`` for ``input_ids`` (batch, seq), each (batch, seq, width), in the order given."""
    captured: dict[int, Tensor] = {}
    handles = []

    def reader(index: int):
        def record(value) -> None:
            captured[index] = (value[0] if isinstance(value, tuple) else value).detach()
            if len(captured) == len(sites):
                raise StopForward

        return record

    try:
        for index, site in enumerate(sites):
            record = reader(index)
            if site.reads_input:
                handles.append(
                    site.module.register_forward_pre_hook(
                        lambda _m, args, kwargs, r=record: r(module_input(args, kwargs)), with_kwargs=True
                    )
                )
            else:
                handles.append(site.module.register_forward_hook(lambda _m, _a, out, r=record: r(out)))
        model(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [site.name for index, site in enumerate(sites) if index not in captured]
    if missing:
        raise RuntimeError(f"hook points {', '.join(missing)} were not reached by the forward pass")
    return [captured[index] for index in range(len(sites))]
