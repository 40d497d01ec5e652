"""``AdapterSet``: the trainable adapter weights of one network, separate from any model.

This is what flows on a NETWORK socket. It holds its own small modules, the names of the base
layers they adapt (per component: the denoiser ``unet`` or ``transformer``, ``text_encoder``,
``text_encoder_2``), the config that
made them and the identity of the base model they were made for. It never holds the base model:
the bundle stays shared and unmodified, and ``attached()`` (in ``attach.py``) connects the two only
for as long as a consumer (training step, sampler, saver) runs. Re-running LoRAInject with another
rank therefore builds a new AdapterSet; nothing of the old one is left in the model to stack on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from .config import AdapterConfig, AdapterError
from .modules import AdapterModule, make_module

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def component_modules(bundle) -> dict[str, nn.Module]:
    """The adaptable components of a ModelBundle by name (the VAE is never adapted)."""
    out = {bundle.family.denoiser: bundle.denoiser}
    for spec, te in zip(bundle.family.text_encoders, bundle.text_encoders):
        out[spec.name] = te
    return out


@dataclass(frozen=True)
class AdapterEntry:
    component: str
    name: str  # module name inside the component, e.g. "down_blocks.0.attentions.0.proj_in"
    module: AdapterModule


class AdapterSet(nn.Module):
    """Adapters for a set of named base layers. An ``nn.Module`` so optimizers, ``.to()``,
    ``.train()`` and ``state_dict()`` work as usual; its parameters are the only trainable ones."""

    def __init__(self, config: AdapterConfig, family, base_identity: str = "", unet_config: Mapping | None = None):
        super().__init__()
        self.config = config
        self.family = family
        self.base_identity = base_identity
        # weight storage per component of the base it is trained on ({"transformer": "nf4", "vae": "bf16", ...},
        # ModelBundle.precisions): saved as nodetrainer_base_precision, so applying it elsewhere can warn
        self.base_precision: dict[str, str] = {}
        self.unet_config = dict(unet_config or {})
        self.adapters = nn.ModuleList()
        self._index: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ building

    def add(self, component: str, name: str, module: AdapterModule) -> None:
        if (component, name) in self._index:
            raise AdapterError(f"{component}.{name} is adapted twice")
        self._index.append((component, name))
        self.adapters.append(module)

    def entries(self) -> Iterator[AdapterEntry]:
        for (component, name), module in zip(self._index, self.adapters):
            yield AdapterEntry(component, name, module)

    def get(self, component: str, name: str) -> AdapterModule:
        return self.adapters[self._index.index((component, name))]

    def __len__(self) -> int:
        return len(self._index)

    # ------------------------------------------------------------------ facts

    @property
    def components(self) -> list[str]:
        return sorted({c for c, _ in self._index}, key=COMPONENTS.index)

    def num_parameters(self) -> int:
        """Trainable parameter count (what users compare between ranks and algorithms)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> dict[str, Any]:
        per = {c: sum(1 for cc, _ in self._index if cc == c) for c in self.components}
        return {
            "algorithm": self.config.algorithm,
            "rank": self.config.rank,
            "alpha": self.config.alpha,
            "layers": per,
            "trainable_parameters": self.num_parameters(),
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per component, so the UNet and text encoders can get different learning rates."""
        groups: dict[str, list[nn.Parameter]] = {}
        for e in self.entries():
            groups.setdefault(e.component, []).extend(p for p in e.module.parameters() if p.requires_grad)
        return groups

    def extra_repr(self) -> str:
        return f"{self.config.algorithm}, rank={self.config.rank}, alpha={self.config.alpha}, layers={len(self)}"


def create_adapter_set(bundle, config: AdapterConfig, *, device: "torch.device | str | None" = None,
                       dtype: torch.dtype = torch.float32) -> AdapterSet:
    """Build fresh adapters for ``bundle`` as ``config`` says (seeded; the caller's RNG is untouched).

    The adapters are kept in ``dtype`` (fp32 by default, whatever the base model's dtype: low-rank
    weights in fp16 collect zeros). Raises ``AdapterError`` if the presets select nothing at all.
    """
    comps = component_modules(bundle)
    aset = AdapterSet(config, bundle.family, getattr(bundle, "identity", ""), bundle.denoiser.config)
    aset.base_precision = dict(getattr(bundle, "precisions", {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.seed))
        for component, preset in config.targets.items():
            if preset == "none":
                continue
            if component == "unet":  # the targets' key for "the denoiser", whatever the family calls it
                component = bundle.family.denoiser
            if component not in comps:
                if component == "text_encoder_2":
                    continue  # a single-encoder family simply has no second encoder
                raise AdapterError(f"{bundle.family.display_name} has no component {component!r}")
            model = comps[component]
            custom = config.custom.get(component, config.custom.get("unet", ()) if component == bundle.family.denoiser else ())
            names = bundle.family.adapter_targets(model, component, preset, custom, config.adapts_3x3_convs)
            for name in names:
                base = model.get_submodule(name)
                is_3x3 = isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
                rank = config.effective_conv_rank if is_3x3 else config.rank
                alpha = config.effective_conv_alpha if is_3x3 else config.alpha
                module = make_module(
                    config.algorithm, base, rank, alpha, factor=config.factor,
                    dropout=config.dropout, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                )
                aset.add(component, name, module)
    if len(aset) == 0:
        raise AdapterError("the layer presets selected no layers; choose a preset other than 'none' for the UNet or a text encoder")
    device = device if device is not None else bundle.denoiser.device
    return aset.to(device=device, dtype=dtype)
