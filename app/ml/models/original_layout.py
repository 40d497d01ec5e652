"""diffusers -> original (LDM / A1111 / Civitai) key layout, the inverse of diffusers' converters.

Loading goes through diffusers' own ``convert_ldm_*`` functions; this module goes the other way.
Today it builds original-layout test checkpoints from tiny models and the full-size benchmark file,
so single-file loading is exercised through the real ``load_model`` path. A future
``save_single_file`` can reuse it. The mapping is derived from the UNet config (layers per block,
number of blocks), so it works for tiny and full-size models alike.

Works on any tensors, including ``meta`` tensors (shapes only), which is how the benchmark gets the
full-size key list without allocating a real model.
"""

from __future__ import annotations

from typing import Mapping

import torch

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _sub(rest: str, table: Mapping[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key_to_original(key: str, unet_config: Mapping) -> str:
    """Map one diffusers ``UNet2DConditionModel`` key to its ``model.diffusion_model.`` name."""
    lpb = unet_config["layers_per_block"]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.* -> input_blocks.n.0.op.*
            n = 1 + b * (lpb + 1) + lpb
            return f"input_blocks.{n}.0.op." + ".".join(parts[5:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        n = 1 + b * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{n}.0." + _sub(rest, _UNET_RESNET)
        return f"input_blocks.{n}.1." + rest
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}." + _sub(rest, _UNET_RESNET)
        return "middle_block.1." + rest
    if parts[0] == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        block_type = unet_config["up_block_types"][b]
        if kind == "upsamplers":  # -> output_blocks.n.{1|2}.conv.*
            n = b * (lpb + 1) + lpb
            slot = 2 if "CrossAttn" in block_type else 1
            return f"output_blocks.{n}.{slot}.conv." + ".".join(parts[5:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        n = b * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{n}.0." + _sub(rest, _UNET_RESNET)
        return f"output_blocks.{n}.1." + rest
    mapped = _sub(key, _UNET_TOP)
    if mapped == key:
        raise KeyError(f"no original-layout name known for UNet key {key!r}")
    return mapped


def unet_to_original(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model." + unet_key_to_original(k, unet_config): v for k, v in state_dict.items()}


_VAE_TOP = {
    "conv_norm_out": "norm_out",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` -> ``first_stage_model.*`` (attention projections back to 1x1 convs)."""
    n_up = len(vae_config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
        if side in ("quant_conv", "post_quant_conv"):
            out["first_stage_model." + key] = value
            continue
        rest = parts[1:]
        head = rest[0]
        if head in ("down_blocks", "up_blocks"):
            b = int(rest[1])
            level = b if head == "down_blocks" else n_up - 1 - b
            word = "down" if head == "down_blocks" else "up"
            if rest[2] in ("downsamplers", "upsamplers"):
                sampler = "downsample" if head == "down_blocks" else "upsample"
                new = f"{word}.{level}.{sampler}." + ".".join(rest[4:])
            else:  # resnets
                tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{word}.{level}.block.{rest[3]}." + tail
        elif head == "mid_block":
            if rest[1] == "resnets":
                tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
                new = f"mid.block_{int(rest[2]) + 1}." + tail
            else:
                tail = _sub(".".join(rest[3:]), _VAE_ATTN)
                new = "mid.attn_1." + tail
                if value.ndim == 2:
                    value = value.reshape(*value.shape, 1, 1)
        else:
            new = _sub(".".join(rest), _VAE_TOP)
        out[f"first_stage_model.{side}.{new}"] = value
    return out


def clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` -> ``<prefix>text_model.*`` (the layout SD1.x and SDXL TE1 use)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = value
    return out


_OPEN_CLIP_LAYER = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def open_clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model (with projection) -> OpenCLIP names (SD2 / SDXL TE2 layout)."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous() if value.device.type != "meta" else value.T
        elif key.startswith("encoder.layers."):
            parts = key.split(".")
            layer, rest = parts[2], ".".join(parts[3:])
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                proj, kind = rest.split(".")[1], rest.split(".")[2]
                qkv.setdefault(base + "attn.in_proj_" + kind, {})[proj] = value
                continue
            for new, old in _OPEN_CLIP_LAYER:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            out[base + rest] = value
        else:
            raise KeyError(f"no OpenCLIP name known for text-encoder key {key!r}")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def to_original_state_dict(
    family_id: str,
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    text_encoders: list[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """A complete original-layout checkpoint state dict for sd15 / sd2 / sd2-v / sdxl."""
    out = unet_to_original(unet, unet_config)
    out.update(vae_to_original(vae, vae_config))
    if family_id == "sd15":
        out.update(clip_to_original(text_encoders[0], "cond_stage_model.transformer."))
    elif family_id in ("sd2", "sd2-v"):
        out.update(open_clip_to_original(text_encoders[0], "cond_stage_model.model."))
    elif family_id == "sdxl":
        out.update(clip_to_original(text_encoders[0], "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_original(text_encoders[1], "conditioner.embedders.1.model."))
    else:
        raise ValueError(f"no original layout for family {family_id!r}")
    return out


def bundle_to_original_state_dict(bundle) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a ``ModelBundle`` (tensors shared, not copied)."""
    return to_original_state_dict(
        bundle.family.id,
        bundle.unet.state_dict(),
        bundle.unet.config,
        bundle.vae.state_dict(),
        bundle.vae.config,
        [te.state_dict() for te in bundle.text_encoders],
    )
