"""What a TrainLoop trains. Adapters patch into the shared base model only while training runs
(see app/ml/adapters); a full fine-tune trains its own copy, so the cached base never changes."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext

import torch


class FullFinetune:
    """Trains a copy of the UNet (and optionally the text encoders); with ``in_place`` (nothing else
    will read the loaded model again: a one-shot run) the loaded modules themselves, saving a copy."""

    def __init__(self, bundle, train_unet: bool = True, train_text_encoders: bool = False, *,
                 in_place: bool = False) -> None:
        if not (train_unet or train_text_encoders):
            raise ValueError("a full fine-tune must train the UNet, the text encoder(s), or both")
        _refuse_quantized(bundle, train_unet, train_text_encoders)
        own = (lambda m: m) if in_place else copy.deepcopy
        self.unet = own(bundle.unet) if train_unet else bundle.unet
        self.text_encoders = tuple(own(te) if train_text_encoders else te for te in bundle.text_encoders)
        # a new handle over the copies: the shared base bundle is never touched
        self.model = dataclasses.replace(bundle, denoiser=self.unet, text_encoders=self.text_encoders)
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

    def adapter_pairs(self) -> list:
        return []

    def to(self, device) -> None:
        pass  # the copies live in self.model, which the trainer moves

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


def _refuse_quantized(bundle, train_unet: bool, train_text_encoders: bool) -> None:
    """Quantized weights (LoadModel's denoiser_quant / text_encoder_quant) are frozen storage: a full
    fine-tune of them is refused before anything is copied, naming the component and what to do."""
    from app.ml.memory.quant import require_trainable

    fam = bundle.family
    trained = ([(fam.denoiser, bundle.denoiser)] if train_unet else []) + (
        [(spec.name, te) for spec, te in zip(fam.text_encoders, bundle.text_encoders)] if train_text_encoders else [])
    quant = getattr(bundle, "quant", {})
    for name, module in trained:
        require_trainable(module, "TrainLoop", what=f"the {name} ({quant.get(name, 'quantized')} from LoadModel)")


def is_embedding(adapter) -> bool:
    """An embedding (textual inversion) among a handle's adapters, as opposed to a LoRA-family set."""
    return bool(getattr(adapter, "is_embedding_set", False))  # app.ml.embeddings.EmbeddingSet


def _trainable(adapter) -> bool:
    return any(p.requires_grad for params in adapter.parameter_groups().values() for p in params)


def trained_indices(handle) -> list[int]:
    """Which of a handle's adapters a TrainLoop trains: the newest LoRA-family set (as always) and
    every embedding whose vectors train (an Embedding node's; LoadEmbedding's are frozen). When an
    embedding trains, an older frozen LoRA (LoadLoRA) stays frozen: embedding-only training."""
    adapters = handle.adapters
    embeddings = [i for i, a in enumerate(adapters) if is_embedding(a) and _trainable(a)]
    sets = [i for i, a in enumerate(adapters) if not is_embedding(a)]
    lora = sets[-1:] if sets and (not embeddings or _trainable(adapters[sets[-1]])) else []
    return sorted(lora + embeddings)


class AdapterTrainable:
    """Trains the newest adapter of a model handle and/or the embeddings added for training (pivotal
    tuning: both, each in its own param group). It trains its own copies, so the cached LoRAInject /
    Embedding outputs (and the base model) stay exactly as they were; with ``in_place`` (nothing else
    will read them again: a one-shot run) the adapters themselves."""

    def __init__(self, handle, *, in_place: bool = False) -> None:
        picked = trained_indices(handle)
        if not picked:
            raise ValueError("the model has no adapter or embedding to train")
        self.handle = handle
        self.model = handle.base
        own = (lambda a: a) if in_place else copy.deepcopy
        # the others stay attached but frozen: on copies, so the cached ones keep their flags
        self.pairs = [(own(a) if i in picked else copy.deepcopy(a).requires_grad_(False), s)
                      for i, (a, s) in enumerate(zip(handle.adapters, handle._strengths()))]
        self.picked = picked
        trained = [self.pairs[i][0] for i in picked]
        self.embeddings = [a for a in trained if is_embedding(a)]
        sets = [a for a in trained if not is_embedding(a)]
        self.adapter = sets[0] if sets else None  # the LoRA-family set, if one trains
        self._trains_te = self.adapter is not None and any(
            c.startswith("text_encoder") for c in self.adapter.parameter_groups())

    def param_groups(self, optimizer_settings: dict) -> list[dict]:
        groups = []
        if self.adapter is not None:
            for component, params in self.adapter.parameter_groups().items():
                key = "text_encoder_lr" if component.startswith("text_encoder") else "lr"
                lr = float(optimizer_settings.get(key, optimizer_settings["lr"]))
                groups.append({"name": component, "params": list(params), "lr": lr})
        if self.embeddings:
            params = [p for e in self.embeddings for ps in e.parameter_groups().values() for p in ps]
            groups.append({"name": "embedding", "params": params,
                           "lr": float(optimizer_settings.get("embedding_lr", 5e-3))})
        return groups

    def components(self):
        return self.model.unet, self.model.text_encoders

    def attached(self):
        from app.ml.adapters import attached

        return attached(self.model, self.adapter_pairs())

    def trains_text_encoder(self) -> bool:
        return self._trains_te

    def trains_embedding(self) -> bool:
        return bool(self.embeddings)

    def adapter_pairs(self) -> list:
        return list(self.pairs)

    def to(self, device) -> None:
        for a, _ in self.pairs:
            a.to(device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA's tensors under their own names (backups of LoRA runs read as before), each
        embedding's under ``embeddings.<i>.``."""
        out = dict(self.adapter.state_dict()) if self.adapter is not None else {}
        for i, e in enumerate(self.embeddings):
            out.update({f"embeddings.{i}.{k}": v for k, v in e.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith("embeddings.")}
        if self.adapter is not None:
            self.adapter.load_state_dict(own)
        for i, e in enumerate(self.embeddings):
            prefix = f"embeddings.{i}."
            e.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def trained_handle(self):
        """A new handle with the trained adapter and embeddings in place of the untrained ones."""
        from app.ml.handle import ModelHandle

        h = self.handle
        adapters = tuple(self.pairs[i][0] if i in self.picked else a for i, a in enumerate(h.adapters))
        for e in self.embeddings:  # a stop during the run froze them; they stay what a later TrainLoop trains
            e.requires_grad_(True)
        return ModelHandle(h.base, adapters, h.strengths, dict(h.info))
