"""Our Flux LoRA training step (LoRAInject's adapters attached by hooks, the family's denoiser call and flow
objective) does no more work than the diffusers + peft loop of ``train_dreambooth_lora_flux.py``
(``tests/bench/bench_flux.py step`` times both at full width): counted here as torch ops and bytes of fresh
tensors over one forward and backward, which a loaded machine cannot blur."""

import copy
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from app.ml.adapters import AdapterConfig, attached, create_adapter_set
from app.ml.adapters.modules import LoRAModule
from app.ml.flux import tiny
from app.ml.flux.flow import FlowSettings
from app.ml.flux.latents import image_ids, pack, text_ids, unpack
from app.ml.models.bundle import ModelBundle
from app.ml.models.families import FLUX_DEV


class Work(TorchDispatchMode):
    """Counts aten ops and the bytes of every new (non-view) tensor they return."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if not func._schema.is_mutable and all(r.alias_info is None for r in func._schema.returns):  # no view, no in-place
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
                    self.sizes.append(t.numel())
        return out


@pytest.fixture(scope="module")
def model():
    return tiny.build_transformer().requires_grad_(False)


H = W = 8  # a 64 px image: 16 tokens
TEXT = 8


@pytest.fixture(scope="module")
def inputs(model):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 16, H, W, generator=g), torch.randn(1, TEXT, model.config.joint_attention_dim, generator=g),
            torch.randn(1, model.config.pooled_projection_dim, generator=g))


def _targets(m):
    attn = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                      r"add_v_proj|to_add_out)$")
    mlp = re.compile(r"^transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$|"
                     r"^single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$")
    return [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and (attn.search(n) or mlp.search(n))]


def ours(model, inputs) -> Work:
    from app.ml.train.objective import FlowObjective, ObjectiveSettings, per_sample_loss

    latents, embeds, pooled = inputs
    m = copy.deepcopy(model).train()
    b = ModelBundle(family=FLUX_DEV, denoiser=m, vae=None, text_encoders=(None, None), tokenizers=(None, None),
                    scheduler_config={}, dtypes={}, identities={})
    aset = create_adapter_set(b, AdapterConfig(rank=4, alpha=4.0, targets={"unet": "attn-mlp"}))
    assert sorted(e.name for e in aset.entries()) == sorted(_targets(m))
    objective = FlowObjective(FlowSettings(shift="fixed"), ObjectiveSettings())
    cond = b.family.conditioning(b, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, pixel_size=(64, 64),
                                 batch=1, device="cpu", guidance=1.0)
    work = Work()
    with attached(b, aset), work:
        g = torch.Generator().manual_seed(2)
        noise, sigma = objective.draw(tuple(latents.shape), g)
        noisy = objective.noisy(latents, noise, sigma, g)
        pred = b.family.predict(m, noisy, sigma, cond)
        loss = (per_sample_loss(pred, objective.target(latents, noise, sigma), objective.s)
                * objective.weights(sigma)).mean()
        loss.backward()
    return work


def reference(model, inputs) -> Work:
    """diffusers' train_dreambooth_lora_flux.py step: peft LoRA on the same modules, packed latents, MSE on ε − x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from peft import LoraConfig

    latents, embeds, pooled = inputs
    m = copy.deepcopy(model)
    m.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=_targets(m)))
    m.train()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.1582)
    img, txt = image_ids(H, W), text_ids(TEXT)
    work = Work()
    with work:
        g = torch.Generator().manual_seed(2)
        noise = torch.randn(latents.shape, generator=g)
        u = torch.sigmoid(torch.randn(1, generator=g))
        sigma = sched.sigmas[(u * sched.config.num_train_timesteps).long()].flatten()
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
        out = m(hidden_states=pack(noisy), timestep=sigma, guidance=torch.full((1,), 1.0), pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=txt, img_ids=img, return_dict=False)[0]
        loss = torch.mean(((unpack(out, H, W).float() - (noise - latents)) ** 2).reshape(1, -1), 1).mean()
        loss.backward()
    return work


def test_our_lora_step_does_no_more_work_than_the_peft_reference(model, inputs):
    mine, ref = ours(model, inputs), reference(model, inputs)
    assert mine.ops < ref.ops, (mine.ops, ref.ops)
    assert mine.bytes < ref.bytes, (mine.bytes, ref.bytes)


def test_lora_branch_makes_no_output_sized_temporaries():
    """base_out + s·(h @ upᵀ) in one addmm: forward and backward make only the result, no product or scaled copy."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96).requires_grad_(False)
    lora = LoRAModule(base, 4, 2.0)
    torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    x = torch.randn(2, 5, 64, requires_grad=True)
    base_out = base(x)
    work = Work()
    with work:
        y = lora(base, x, base_out, 0.7)
        y.backward(torch.ones_like(y))
    assert sum(n == base_out.numel() for n in work.sizes) == 2  # the result, and the ones_like gradient above
    expected = base_out + (x @ lora.lora_down.weight.t() @ lora.lora_up.weight.t()) * (0.5 * 0.7)
    assert torch.allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_output_and_gradients_match_the_unfused_formula(dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48).requires_grad_(False).to(dtype)
    lora = LoRAModule(base, 8, 4.0).to(dtype)
    torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    x = torch.randn(3, 7, 32, dtype=dtype)
    y = lora(base, x, base(x), 0.5)
    y.float().square().sum().backward()
    got = [p.grad.clone() for p in (lora.lora_down.weight, lora.lora_up.weight)]
    lora.zero_grad()
    ref = base(x) + lora.lora_up(lora.lora_down(x)) * (0.5 * 0.5)
    ref.float().square().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)
    for g, p in zip(got, (lora.lora_down.weight, lora.lora_up.weight)):
        assert torch.allclose(g.float(), p.grad.float(), atol=tol * 10, rtol=tol * 10)


def test_fused_lora_under_cpu_autocast_matches_the_unfused_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48).requires_grad_(False)
    lora = LoRAModule(base, 8, 8.0)
    torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    x = torch.randn(2, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base_out = base(x)
        y = lora(base, x, base_out, 1.0)
        ref = base_out + lora.lora_up(lora.lora_down(x)) * 1.0
    assert y.dtype == ref.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
