"""What a TrainLoop trains. Adapters patch into the shared base model only while training runs
(see app/ml/adapters); a full fine-tune trains its own copy, so the cached base never changes."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext

import torch


class FullFinetune:
    """Trains a copy of the UNet (and optionally the text encoders)."""

    def __init__(self, bundle, train_unet: bool = True, train_text_encoders: bool = False) -> None:
        if not (train_unet or train_text_encoders):
            raise ValueError("a full fine-tune must train the UNet, the text encoder(s), or both")
        self.unet = copy.deepcopy(bundle.unet) if train_unet else bundle.unet
        self.text_encoders = tuple(copy.deepcopy(te) if train_text_encoders else te for te in bundle.text_encoders)
        # a new handle over the copies: the shared base bundle is never touched
        self.model = dataclasses.replace(bundle, unet=self.unet, text_encoders=self.text_encoders)
        self.train_unet = train_unet
        self.train_te = train_text_encoders
        for m in [self.unet, *self.text_encoders]:
            m.requires_grad_(False)

    def param_groups(self, optimizer_settings: dict) -> list[dict]:
        groups = []
        if self.train_unet:
            groups.append({"name": "unet", "params": list(self.unet.parameters()), "lr": float(optimizer_settings["lr"])})
        if self.train_te:
            te_lr = float(optimizer_settings.get("text_encoder_lr", optimizer_settings["lr"]))
            for i, te in enumerate(self.text_encoders):
                groups.append({"name": f"text_encoder{'' if i == 0 else '_' + str(i + 1)}",
                               "params": list(te.parameters()), "lr": te_lr})
        return groups

    def components(self):
        return self.unet, self.text_encoders

    def attached(self):
        return nullcontext()  # nothing to patch: the copies are trained directly

    def trains_text_encoder(self) -> bool:
        return self.train_te

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.train_unet:
            out.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()})
        if self.train_te:
            for i, te in enumerate(self.text_encoders):
                out.update({f"text_encoder{i}.{k}": v for k, v in te.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.train_unet:
            self.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        if self.train_te:
            for i, te in enumerate(self.text_encoders):
                prefix = f"text_encoder{i}."
                te.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
