"""Reading several sites of a frozen language model in one forward pass (the activation cache's harvest, and the
activation data module's ``sites``).

Each site is a ``HookPoint`` of ``neurolight.datamodules.llm.hooked`` (``resolve_hook_point``): a forward hook on the
module's output, or a pre-hook on its input. The forward stops, by ``StopForward``, as soon as every site has been
read, so no layer after the deepest site runs. A single site read this way is bit-identical to
``HookedLLM.harvest`` (which checks its truncated forward against this hooked one). ``SitesReader`` reads the same
sites through the truncated forward, compiled where asked, after the same check.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neurolight.datamodules.llm.hooked import HookPoint, StopForward, module_input, truncation_blocker
from neurolight.datamodules.llm.truncated import compiled, forward_to_sites, probe_mismatch, run


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


class SitesReader:
    """The activations of several sites (``(layer_type, layer_id)`` with their ``hook_points``) from one forward
    pass: the truncated forward (``truncated.forward_to_sites``; ``torch.compile``d where ``compile``, as
    ``HookedLLM`` compiles its one site) where every site allows it and it reproduces ``capture_sites`` on a probe
    input, else ``capture_sites`` itself (with a warning naming why)."""

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[tuple[str, int]],
        hook_points: Sequence[HookPoint],
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        self.model, self.sites, self.hook_points = model.eval().requires_grad_(False), list(sites), list(hook_points)
        self.device = next(model.parameters()).device
        blockers = (truncation_blocker(model, *site, hook) for site, hook in zip(self.sites, self.hook_points))
        blocker = next((reason for reason in blockers if reason is not None), None)
        if blocker is None:
            blocker = probe_mismatch(model, self.sites, lambda ids: capture_sites(model, self.hook_points, ids))
        if blocker is not None:
            warnings.warn(
                f"reading the sites through the hooked full forward ({blocker}): slower, same activations", stacklevel=2
            )
        self.truncated = blocker is None
        self.compiled = compile and self.truncated
        self._fn = compiled(self._forward, self.device, compile_mode) if self.compiled else self._forward

    def _forward(self, input_ids: Tensor, mask, position_embeddings=None) -> list[Tensor]:
        return forward_to_sites(self.model, self.sites, input_ids, mask, position_embeddings)

    @torch.no_grad()
    def read(self, input_ids: Tensor) -> list[Tensor]:
        """The activations of the sites for ``input_ids`` (batch, seq), each (batch, seq, width), in order."""
        input_ids = input_ids.to(self.device)
        if not self.truncated:
            return capture_sites(self.model, self.hook_points, input_ids)
        return run(self._fn, self.model, input_ids, self.compiled)
