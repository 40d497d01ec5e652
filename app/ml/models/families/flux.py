"""Flux.1 (dev and schnell): a rectified-flow transformer over 16-channel latents packed into 2x2 patches,
conditioned on T5-XXL hidden states and CLIP-L's pooled output (dev also on a distilled guidance
value), sampled with flow-matching Euler and the resolution-dependent shift.

The building blocks live in ``app/ml/flux/`` (packing and position ids, the flow objective, key and
LoRA layouts, header detection); this module is where the rest of the code asks for them. Latents
are kept unpacked (B x 16 x h x w) everywhere outside the denoiser call, so caching, masks and
buckets work exactly as for SD; ``predict`` packs them for the transformer and unpacks its output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .base import ModelFamily, TextEncoderSpec
from .memory import ActivationProfile

GUIDANCE_SAMPLE_DEFAULT = 3.5  # dev's distilled guidance for previews (FluxPipeline's default)


@dataclass(frozen=True)
class FluxFamily(ModelFamily):
    guidance_embeds: bool = True  # dev: the guidance value is a model input; schnell has no embedder
    t5_max_length: int = 512  # T5 tokens (dev 512, schnell 256); LoadModel's text_max_length overrides

    def check_components(self, denoiser, text_encoders, source: str) -> None:
        from .base import ModelLoadError

        clip, t5 = text_encoders
        cfg = denoiser.config
        for what, want, got in (("T5 width (joint_attention_dim)", cfg.joint_attention_dim, t5.config.d_model),
                                ("CLIP pooled width (pooled_projection_dim)", cfg.pooled_projection_dim,
                                 clip.config.hidden_size)):
            if want != got:
                raise ModelLoadError(f"{source}: the Flux transformer expects a {what} of {want} but the text encoder "
                                     f"gives {got}; the components do not belong together.")

    # ------------------------------------------------------------------ text
    def set_text_length(self, tokenizers, length: int, source: str) -> None:
        """T5 pads/cuts prompts to ``length`` tokens (dev 512, schnell 256 by default); the length is part of
        the text identity, so cached embeddings of another length are not reused."""
        from .base import ModelLoadError

        if not 1 <= int(length) <= 512:
            raise ModelLoadError(f"{source}: text_max_length {length} is out of range; Flux's T5 reads 1 to 512 tokens.")
        tokenizers[1].model_max_length = int(length)

    def text_key(self, bundle) -> str:
        return f"t5_length={bundle.tokenizers[1].model_max_length}"

    def encode_prompts(self, bundle, prompts: Sequence[str], *, clip_skip: int = 1, with_grad: bool = False,
                       chunks: int = 1) -> dict[str, Any]:
        """``{"prompt_embeds": B x L x D_t5, "pooled_prompt_embeds": B x D_clip}`` as FluxPipeline encodes them:
        T5's last hidden state over the prompt padded to L tokens (the T5 tokenizer's ``model_max_length``,
        the loaded max length), and CLIP-L's pooled output over 77 tokens. ``clip_skip`` and ``chunks``
        have no meaning for Flux and are ignored (T5 reads the long prompt itself)."""
        from contextlib import nullcontext

        import torch

        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        clip, t5 = bundle.text_encoders
        clip_tok, t5_tok = bundle.tokenizers
        ctx = nullcontext() if with_grad else torch.no_grad()
        with ctx:
            ids = clip_tok(list(prompts), padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
            pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
            ids = t5_tok(list(prompts), padding="max_length", max_length=t5_tok.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
            hidden = t5(ids.to(t5.device), output_hidden_states=False)[0]
        return {"prompt_embeds": hidden.float(), "pooled_prompt_embeds": pooled.float()}

    # ------------------------------------------------------------------ the denoiser call
    def conditioning(self, bundle, text: Mapping[str, Any], *, pixel_size: tuple[int, int], batch: int,
                     device, original_sizes=None, crops_top_left=None, guidance: float | None = None) -> dict[str, Any]:
        from app.ml.flux.latents import text_ids

        embeds = text["prompt_embeds"]
        cond = {"encoder_hidden_states": embeds, "pooled_projections": text["pooled_prompt_embeds"],
                "txt_ids": text_ids(embeds.shape[1], device=device)}
        if guidance is not None:
            cond["guidance"] = float(guidance)
        return cond

    def predict(self, denoiser, noisy, timesteps, cond: Mapping[str, Any]):
        """Pack the latents, call the transformer with σ as timestep (it multiplies by 1000), unpack."""
        import torch

        from app.ml.flux.latents import image_ids, pack, unpack

        b, _, h, w = noisy.shape
        kwargs = dict(cond)
        value = kwargs.pop("guidance", None)
        if getattr(denoiser.config, "guidance_embeds", False):
            value = 1.0 if value is None else value
            kwargs["guidance"] = torch.full((b,), float(value), device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype),
                       img_ids=image_ids(h, w, device=noisy.device, dtype=noisy.dtype), return_dict=False, **kwargs)[0]
        return unpack(out, h, w)

    # ------------------------------------------------------------------ training
    def make_objective(self, bundle, settings):
        from app.ml.train.objective import FlowObjective

        return FlowObjective(settings.flow, settings.objective)

    # ------------------------------------------------------------------ adapters
    lora_presets: tuple[str, ...] = ("attn-mlp", "attn-only", "full", "single-blocks", "custom", "none")

    def adapter_targets(self, model, component: str, preset: str, custom, allow_3x3: bool) -> list[str]:
        """Transformer presets on its Linear layers: ``attn-only`` (q/k/v/out of both streams), ``attn-mlp``
        (plus the MLPs: kohya's and ai-toolkit's usual set), ``full`` (every Linear in the blocks and the
        embedders), ``single-blocks`` (the single-stream blocks only), ``custom`` (names or regexes)."""
        import re

        from app.ml.adapters.config import AdapterError
        from app.ml.adapters.targets import select_targets

        if component != self.denoiser or preset in ("custom", "none"):
            return select_targets(model, component, preset, custom, allow_3x3)
        from torch import nn

        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # quantized ones too (QLoRA)
        attn = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                          r"add_v_proj|to_add_out)$")
        mlp = re.compile(r"^transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$|"
                         r"^single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$")
        if preset == "attn-only":
            return [n for n in linear if attn.search(n)]
        if preset == "attn-mlp":
            return [n for n in linear if attn.search(n) or mlp.search(n)]
        if preset == "single-blocks":
            return [n for n in linear if n.startswith("single_transformer_blocks.")]
        if preset == "full":
            return linear
        raise AdapterError(f"unknown layer preset {preset!r} for the Flux transformer; choose one of "
                           f"{', '.join(self.lora_presets)}")

    def _lora_weights(self, entries) -> dict:
        from app.ml.flux.lora_keys import LoraWeights

        return {e.name: LoraWeights(e.module.lora_down.weight.detach().float().cpu(),
                                    e.module.lora_up.weight.detach().float().cpu(), float(e.module.alpha))
                for e in entries}

    def adapter_file(self, aset, layout: str, unet_naming: str | None = None) -> tuple[dict, dict[str, str]]:
        """kohya: ``lora_unet_double_blocks_0_img_attn_qkv`` (BFL names, q/k/v(/mlp) fused exactly); comfyui:
        ``diffusion_model.double_blocks.0…``; peft: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``.

        LoHa, LoKr and DoRA (kohya/comfyui only) keep BFL names on unfused weights and use ComfyUI's
        per-projection ``lycoris_transformer_blocks_0_attn_to_q`` keys on fused ones (see ``lora_keys``);
        a CLIP-L LoRA is written as ``lora_te1_…`` (``text_encoder.…`` in the PEFT layout)."""
        import json

        import torch

        from app.ml.adapters.config import AdapterError
        from app.ml.adapters.io import PEFT_METADATA_KEY, peft_metadata
        from app.ml.adapters.modules import LoRAModule
        from app.ml.adapters.naming import module_key
        from app.ml.flux import lora_keys

        if layout not in ("kohya", "comfyui", "peft"):
            raise AdapterError(f"unknown LoRA layout {layout!r}; choose kohya, peft or comfyui")
        entries = list(aset.entries())
        den = [e for e in entries if e.component == self.denoiser]
        plain = all(isinstance(e.module, LoRAModule) and e.module.dora_scale is None for e in entries)
        if layout == "peft" and not plain:
            raise AdapterError(f"the diffusers/PEFT layout holds plain LoRA only; save {aset.config.algorithm} "
                               "adapters on Flux in the kohya or comfyui layout")
        out: dict = {}
        meta: dict[str, str] = {}

        def module_tensors(prefix, m):
            if layout == "peft":
                out[prefix + ".lora_A.weight"] = m.lora_down.weight
                out[prefix + ".lora_B.weight"] = m.lora_up.weight
                return
            for pname, p in m.named_parameters():  # parameter names are the LyCORIS tensor names
                out[f"{prefix}.{pname}"] = p
            out[prefix + ".alpha"] = m.alpha

        try:
            if den and all(isinstance(e.module, LoRAModule) and e.module.dora_scale is None for e in den):
                loras = self._lora_weights(den)
                if layout == "kohya":
                    out.update(lora_keys.to_kohya(loras))
                elif layout == "comfyui":
                    out.update(lora_keys.to_comfy(loras))
                else:
                    tensors, meta = lora_keys.to_peft(loras)
                    out.update(tensors)
            elif den:
                prefixes = lora_keys.lycoris_prefixes([e.name for e in den], layout)
                for e in den:
                    module_tensors(prefixes[e.name], e.module)
        except lora_keys.FluxLoraKeyError as e:
            raise AdapterError(str(e)) from None
        te = [e for e in entries if e.component != self.denoiser]
        for e in te:
            module_tensors(module_key(e.component, e.name, layout, self, aset.unet_config, unet_naming), e.module)
        if layout == "peft" and te:
            te_meta = {k: v for k, v in peft_metadata(aset).items() if not k.startswith(self.denoiser + ".")}
            merged = json.loads(meta.get(PEFT_METADATA_KEY, "{}"))
            merged.update(te_meta)
            meta = {**meta, PEFT_METADATA_KEY: json.dumps(merged), "format": "pt"}
        return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}, meta

    def read_adapter_tensors(self, tensors, metadata, where: str):
        """Any Flux LoRA layout (kohya/BFL, ComfyUI, PEFT; fused blocks split exactly; LoHa/LoKr/DoRA with BFL
        or per-projection ``lycoris_`` keys) as ``transformer.<module>.<tensor>``; text-encoder keys
        (``lora_te1_…``, ``text_encoder.…``) pass through to the generic reader."""
        import torch

        from app.ml.adapters.config import AdapterError
        from app.ml.flux import lora_keys

        tensors = super().read_adapter_tensors(tensors, metadata, where)
        te = {k: v for k, v in tensors.items() if k.startswith(("lora_te", "text_encoder"))}
        rest = {k: v for k, v in tensors.items() if k not in te}
        out = {}
        try:
            if rest and lora_keys.is_lycoris_file(rest):
                out = {f"{self.denoiser}.{k}": v for k, v in lora_keys.from_lycoris_tensors(rest, where=where).items()}
            elif rest:
                for name, lo in lora_keys.from_file_tensors(rest, metadata, where=where).items():
                    out[f"{self.denoiser}.{name}.lora_down.weight"] = lo.down
                    out[f"{self.denoiser}.{name}.lora_up.weight"] = lo.up
                    out[f"{self.denoiser}.{name}.alpha"] = torch.tensor(float(lo.alpha))
        except lora_keys.FluxLoraKeyError as e:
            raise AdapterError(str(e)) from None
        if not self.guidance_embeds:  # a dev LoRA on schnell: the blocks apply, dev's guidance embedder does not exist
            from app.ml.flux.variants import GUIDANCE_MODULE

            out = {k: v for k, v in out.items() if not k.startswith(f"{self.denoiser}.{GUIDANCE_MODULE}")}
        out.update(te)
        return out

    def lora_file_warnings(self, path, metadata) -> list[str]:
        """A Flux LoRA of the other variant (dev on schnell, schnell on dev) loads, with a note naming both; the
        guidance-embedder modules of a dev LoRA are skipped on schnell and named (see ``read_adapter_tensors``)."""
        from pathlib import Path

        from safetensors import safe_open

        from app.ml.flux.variants import cross_variant_warnings, guidance_modules_in, lora_variant

        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
        model = "dev" if self.guidance_embeds else "schnell"
        return cross_variant_warnings(Path(path).name, lora_variant(dict(metadata), keys), model,
                                      guidance_modules_in(keys))

    # ------------------------------------------------------------------ full-model files
    scheduler_class: str = "FlowMatchEulerDiscreteScheduler"

    def single_file_state(self, bundle, state_dicts):
        """The transformer in the BFL layout, as ``flux1-dev.safetensors`` (ae, clip_l, t5xxl stay separate files,
        as ComfyUI keeps them)."""
        from app.ml.flux.keys import diffusers_to_bfl

        return diffusers_to_bfl(state_dicts[self.denoiser], source=f"{self.display_name} transformer")

    def model_index_extras(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ sampling
    def build_pipeline(self, bundle, scheduler=None):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                {k: v for k, v in dict(bundle.scheduler_config).items() if k != "prediction_type"})
        return FluxPipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                            tokenizer=bundle.tokenizers[0], text_encoder_2=bundle.text_encoders[1],
                            tokenizer_2=bundle.tokenizers[1], transformer=bundle.denoiser)

    sample_options: tuple[str, ...] = ("true_cfg",)

    def sample_text(self, bundle, *, prompt: str, negative_prompt: str, cfg: float, sampler: str, clip_skip: int,
                    device, true_cfg: float = 1.0) -> dict[str, Any]:
        """FluxPipeline's text inputs as embeddings (T5's ``prompt_embeds`` and CLIP's ``pooled_prompt_embeds``, and
        the negative prompt's for true CFG), from the pipeline's own ``encode_prompt`` exactly as its call would, so
        T5 can leave the device before the transformer comes."""
        if true_cfg < 1.0:
            raise ValueError(f"Sample: true_cfg {true_cfg} is below 1; use 1 (off) or more.")
        pipe = self.build_pipeline(bundle)
        length = bundle.tokenizers[1].model_max_length
        pos, pooled, _ = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=length)
        text = {"prompt_embeds": pos, "pooled_prompt_embeds": pooled}
        if true_cfg > 1.0:
            neg, neg_pooled, _ = pipe.encode_prompt(prompt=negative_prompt, device=device, max_sequence_length=length)
            text.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return text

    def sample_latents(self, bundle, *, text: Mapping[str, Any], negative_prompt: str, width: int, height: int,
                       steps: int, cfg: float, seed: int, sampler: str, check_cancel=None, true_cfg: float = 1.0):
        """diffusers' FluxPipeline (flow-matching Euler with the dynamic shift) over the bundle's modules, so a
        preview is what a diffusers user gets, from ``text`` (``sample_text``'s embeddings). ``cfg`` is dev's
        distilled guidance, fed only to a transformer
        with a guidance embedder (schnell has none: it is not used, which the recorded implementation says).
        ``true_cfg`` > 1 is real classifier-free guidance with the negative prompt (FluxPipeline's
        ``true_cfg_scale``: two passes a step, pos + s·(pos − neg)); at 1 the negative prompt is not used."""
        import torch

        from app.ml.flux.latents import unpack
        from app.ml.sampling.generate import _step_check

        if true_cfg < 1.0:
            raise ValueError(f"Sample: true_cfg {true_cfg} is below 1; use 1 (off) or more.")
        pipe = self.build_pipeline(bundle)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator("cpu").manual_seed(seed)
        kwargs = dict(width=width, height=height, num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                      output_type="latent", max_sequence_length=bundle.tokenizers[1].model_max_length, **text)
        if true_cfg > 1.0:
            kwargs["true_cfg_scale"] = float(true_cfg)
        if check_cancel is not None:
            check_cancel()
            kwargs["callback_on_step_end"] = _step_check(check_cancel)
        packed = pipe(**kwargs).images
        notes = []
        if not getattr(bundle.denoiser.config, "guidance_embeds", False):
            notes.append("cfg not used (the model has no guidance input)")
        if true_cfg > 1.0:
            notes.append(f"true CFG {true_cfg:g} with the negative prompt")
        elif negative_prompt.strip():
            notes.append("negative prompt ignored (Flux uses distilled guidance; set true_cfg above 1 to use it)")
        impl = "; ".join(["FluxPipeline(FlowMatchEulerDiscreteScheduler, dynamic shift)", *notes])
        return unpack(packed, height // 8, width // 8), impl


CLIP_L_POOLED = TextEncoderSpec(
    name="text_encoder",
    tokenizer="tokenizer",
    architecture="CLIP ViT-L/14 (pooled output)",
    model_class="CLIPTextModel",
    hidden_size=768,
    pooled=True,
    kohya_prefix="lora_te1",
    embedding_key="clip_l",
)
T5_XXL = TextEncoderSpec(
    name="text_encoder_2",
    tokenizer="tokenizer_2",
    architecture="T5 v1.1 XXL encoder",
    model_class="T5EncoderModel",
    hidden_size=4096,
    pad_token="<pad>",
    kohya_prefix="lora_te2",
    hub_tokenizer="t5-xxl",
    embedding_key="t5",
)

FLUX_DEV = FluxFamily(
    id="flux-dev",
    display_name="Flux.1 dev",
    latent_channels=16,
    vae_scale_factor=8,
    vae_scaling_factor=0.3611,
    vae_shift_factor=0.1159,
    bucket_quantization=64,
    default_resolution=1024,
    prediction_type="flow",
    text_encoders=(CLIP_L_POOLED, T5_XXL),
    uses_time_ids=False,
    kohya_base_model_version="flux1",
    kohya_v2=False,
    config_dir="flux1-dev",
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    swap_blocks=("transformer_blocks", "single_transformer_blocks"),  # double-stream, then single-stream
    objective="flow",
    pixel_multiple=16,
    modelspec_architecture="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    kohya_network_module="networks.lora_flux",
    # BFL's img_in, txt_in, time_in / vector_in / guidance_in and final_layer stay unquantized (musubi
    # quantizes only double_blocks / single_blocks); T5's wo is the layer transformers keeps in fp32
    quant_keep=("transformer.x_embedder", "transformer.context_embedder", "transformer.time_text_embed.*",
                "transformer.norm_out.*", "transformer.proj_out", "text_encoder_2.*.DenseReluDense.wo"),
    notes="Guidance-distilled: train with guidance 1.0, sample with about 3.5.",
)
FLUX_SCHNELL = replace(
    FLUX_DEV,
    id="flux-schnell",
    display_name="Flux.1 schnell",
    config_dir="flux1-schnell",
    modelspec_architecture="flux-1-schnell",
    guidance_embeds=False,
    t5_max_length=256,
    sample_steps=4,
    notes="Timestep-distilled: sample in 4 steps; it has no guidance input.",
)

# Activation memory of the Flux transformers, per image + text token of one sample (see memory.py),
# measured by tests/bench/measure_coefficients.py: the full-width transformer at 1+1, 2+1 and 1+2
# double + single blocks, so the cost per block holds at the full 19 + 38.
ACTIVATION_PROFILES = (
    ActivationProfile(  # builtin:tiny-flux, measured whole (its blocks are too small to tell apart)
        name='tiny-flux',
        signature=('FluxTransformer2DModel', 2, 16, 32, 64),
        dtype='fp32', width=32.0,
        base=7636.5, ckpt_base=4231.7,
        per_block=(),
        adapter_factor=1.29, first_step=1.00,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (16, 32, 48)",
    ),
    ActivationProfile(
        name='flux-dev',
        signature=('FluxTransformer2DModel', 24, 128, 4096, 64),
        dtype='bf16', width=3072.0,
        base=51346.3, ckpt_base=180838.4,
        per_block=(('transformer_blocks', 97309.3, 6144.0), ('single_transformer_blocks', 88941.7, 8221.3)),
        adapter_factor=0.81, first_step=1.22,
        measured="tests/bench/measure_coefficients.py, CPU, latent sides (8, 12, 16)",
    ),
)
