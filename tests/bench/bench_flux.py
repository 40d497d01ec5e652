"""Flux.1 dev at full width: LoRA key interop with diffusers, and a LoRA training step against a plain
diffusers + peft loop. Not a pytest test (minutes of CPU, gigabytes of memory).

The real model does not fit this machine's CPU budget (12 B parameters), so both modes build the real
dev transformer config at full width (3072, 24 heads, 4096-wide T5 context, guidance embedder) with fewer
blocks; every double block and every single block is the same module structure, so key maps and per-block
costs carry over to 19 + 38 blocks.

``keys``: LoRA on every linear of the transformer (preset ``full``), saved through Save's code in the kohya/BFL,
ComfyUI and PEFT layouts, then loaded with ``FluxPipeline.load_lora_weights``: modules written, LoRA modules
diffusers injected, loader complaints. ``step``: one process per implementation (fair peak memory): ours
(LoRAInject's adapters attached by hooks, the Flux family's denoiser call and flow objective, TrainLoop's
optimizer from ``build_optimizer``) and the reference written the way diffusers'
``train_dreambooth_lora_flux.py`` trains (``transformer.add_adapter`` with a peft ``LoraConfig`` on the same
modules, packing, ``FlowMatchEulerDiscreteScheduler`` sigmas, MSE on noise - latents, its
``torch.optim.AdamW``), same rank, inputs and learning rate; ms/step after warm-up, peak RSS and RSS before
the first step, and process CPU ms/step (with one thread, the figure a loaded machine blurs least). Both hold only the transformer (the text embeddings and latents are given). ``--rounds``
runs both that many times, alternating which goes first, and reports per-round ratios and their medians,
since a shared machine's load moves between runs; ``--count`` adds each step's torch ops and MB of fresh
tensors (forward + backward), figures load cannot blur. ``step --impl ours --profile 30`` prints the top ops.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python tests/bench/bench_flux.py keys [--double 2 --single 2]
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python tests/bench/bench_flux.py step [--double 1 --single 1 --res 128 --rounds 5 --count]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def transformer(double: int, single: int, dtype=torch.float32, empty: bool = True):
    from diffusers import FluxTransformer2DModel

    from app.ml.flux.variants import config

    cfg = {k: v for k, v in config("dev", "transformer").items() if not k.startswith("_")}
    cfg.update(num_layers=double, num_single_layers=single)
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights():
            m = FluxTransformer2DModel(**cfg)
        m = m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        return m.to(dtype).requires_grad_(False).eval()
    torch.manual_seed(0)
    return FluxTransformer2DModel(**cfg).to(dtype).requires_grad_(False)


def bundle_around(model):
    """A Flux dev bundle with the full-width transformer and the tiny model's other parts (not used here)."""
    from app.ml.models import load_model
    from app.ml.models.bundle import ModelBundle

    tiny = load_model("builtin:tiny-flux")
    return ModelBundle(family=tiny.family, denoiser=model, vae=tiny.vae, text_encoders=tiny.text_encoders,
                       tokenizers=tiny.tokenizers, scheduler_config=dict(tiny.scheduler_config),
                       dtypes={"transformer": model.dtype, **{k: v for k, v in tiny.dtypes.items() if k != "transformer"}},
                       identities=dict(tiny.identities), source="bench")


def bare_bundle(model):
    """A Flux dev bundle holding only the transformer, as the reference loop does (text embeddings and latents
    are given): the step needs no VAE, text encoder or tokenizer, and holding the tiny model's would count
    against ours in peak memory."""
    from app.ml.models.bundle import ModelBundle
    from app.ml.models.families.flux import FLUX_DEV

    return ModelBundle(family=FLUX_DEV, denoiser=model, vae=None, text_encoders=(None, None), tokenizers=(None, None),
                       scheduler_config={}, dtypes={"transformer": model.dtype}, identities={}, source="bench")


def bench_keys(args) -> dict:
    from diffusers import FluxPipeline

    from app.ml.adapters import AdapterConfig, create_adapter_set
    from app.ml.save import save_adapter

    model = transformer(args.double, args.single, torch.bfloat16)
    b = bundle_around(model)
    aset = create_adapter_set(b, AdapterConfig(rank=4, alpha=4.0, targets={"unet": args.preset}))
    with torch.no_grad():
        for e in aset.entries():
            e.module.lora_up.weight.normal_(0, 0.01)
    ours = {e.name for e in aset.entries()}
    out = {"blocks": [args.double, args.single], "preset": args.preset, "modules_ours": len(ours), "layouts": {}}
    tmp = Path(tempfile.mkdtemp())
    for layout in ("kohya", "comfyui", "peft"):
        path = save_adapter(aset, tmp / f"{layout}.safetensors", layout=layout, dtype="bf16")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            n_keys = len(list(f.keys()))
        pipe = FluxPipeline(scheduler=b.family.build_pipeline(b).scheduler, vae=b.vae, text_encoder=b.text_encoders[0],
                            tokenizer=b.tokenizers[0], text_encoder_2=b.text_encoders[1], tokenizer_2=b.tokenizers[1],
                            transformer=model)
        records = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage())
        logging.getLogger("diffusers").addHandler(handler)
        try:
            pipe.load_lora_weights(str(path), adapter_name=layout)
            loaded = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and layout in m.lora_A}
            err = None
        except Exception as e:  # noqa: BLE001 - reported, not raised: this is a measurement
            loaded, err = set(), f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            logging.getLogger("diffusers").removeHandler(handler)
        complaints = [r for r in records if ("unexpected" in r.lower() or "missing" in r.lower() or "not" in r.lower())
                      and "CLIPTextModel" not in r]  # no text-encoder LoRA here: diffusers says so
        out["layouts"][layout] = {"keys": n_keys, "diffusers_loaded": len(loaded), "missing": sorted(ours - loaded)[:5],
                                  "unmatched": len(ours - loaded), "error": err, "complaints": complaints[:3]}
        if loaded:
            pipe.delete_adapters(layout)
    return out


def _step_once(args) -> dict:
    """One implementation in this process (``--impl ours|reference``)."""
    from app.ml.flux.flow import FlowSettings
    from app.ml.flux.latents import image_ids, pack, text_ids, unpack

    torch.manual_seed(0)
    model = transformer(args.double, args.single, torch.float32)
    h = w = args.res // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, h, w, generator=g)
    embeds = torch.randn(1, args.text, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    presets_module = None
    if args.impl == "ours":
        from app.ml.adapters import AdapterConfig, attached, create_adapter_set
        from app.ml.train.objective import FlowObjective, ObjectiveSettings, per_sample_loss

        from app.ml.train.optim import build_optimizer

        b = bare_bundle(model)
        aset = create_adapter_set(b, AdapterConfig(rank=args.rank, alpha=args.rank, targets={"unet": "attn-mlp"}))
        params = [p for p in aset.parameters() if p.requires_grad]
        # TrainLoop's optimizer, from an Optimizer node's settings (AdamW; fused kernels where they apply)
        opt = build_optimizer({"optimizer": "adamw", "weight_decay": 1e-4}, [{"params": params, "lr": 1e-4, "name": "unet"}])
        objective = FlowObjective(FlowSettings(shift="fixed"), ObjectiveSettings())
        cond = b.family.conditioning(b, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled},
                                     pixel_size=(args.res, args.res), batch=1, device="cpu", guidance=1.0)
        ctx = attached(b, [(aset, 1.0)])
        ctx.__enter__()
        model.enable_gradient_checkpointing() if args.checkpointing else None
        model.train()

        def step(i):
            gen = torch.Generator().manual_seed(100 + i)
            noise, sigma = objective.draw(tuple(latents.shape), gen)
            noisy = objective.noisy(latents, noise, sigma, gen)
            pred = b.family.predict(model, noisy, sigma, cond)
            loss = (per_sample_loss(pred, objective.target(latents, noise, sigma), objective.s)
                    * objective.weights(sigma)).mean()
            loss.backward()
            return loss
        presets_module = len(list(aset.entries()))
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from peft import LoraConfig

        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        import re

        attn = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                          r"add_v_proj|to_add_out)$")
        mlp = re.compile(r"^transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$|"
                         r"^single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$")
        targets = [n for n in names if attn.search(n) or mlp.search(n)]
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
        # the script's optimizer: torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        model.enable_gradient_checkpointing() if args.checkpointing else None
        model.train()
        sched = FlowMatchEulerDiscreteScheduler(shift=3.1582)
        img = image_ids(h, w)
        txt = text_ids(args.text)

        def step(i):
            gen = torch.Generator().manual_seed(100 + i)
            noise = torch.randn(latents.shape, generator=gen)
            u = torch.sigmoid(torch.randn(1, generator=gen))  # the script's compute_density_for_timestep_sampling
            idx = (u * sched.config.num_train_timesteps).long()
            sigma = sched.sigmas[idx].flatten()
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
            out = model(hidden_states=pack(noisy), timestep=sigma, guidance=torch.full((1,), 1.0),
                        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt, img_ids=img,
                        return_dict=False)[0]
            pred = unpack(out, h, w)
            loss = torch.mean(((pred.float() - (noise - latents)) ** 2).reshape(1, -1), 1).mean()
            loss.backward()
            return loss
        presets_module = len(targets)
    setup_rss = _rss_mb()
    times, cpu = [], []
    for i in range(args.steps + 1):
        t, c = time.perf_counter(), time.process_time()
        step(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(2):
                step(args.steps + 1 + i)
                opt.step()
                opt.zero_grad(set_to_none=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    work = {}
    if args.count:
        counter = _Work()
        with counter:
            step(args.steps + 3)
        opt.zero_grad(set_to_none=True)
        work = {"ops_per_step": counter.ops, "fresh_tensor_mb_per_step": counter.bytes / 2**20}
    steady = times[1:]
    return {**work, "impl": args.impl, "ms_per_step": 1000 * sum(steady) / len(steady), "first_step_ms": 1000 * times[0],
            "cpu_ms_per_step": 1000 * sum(cpu[1:]) / len(cpu[1:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "setup_rss_mb": setup_rss,
            "lora_modules": presets_module,
            "trainable": sum(p.numel() for p in params), "transformer_params": sum(p.numel() for p in model.parameters()
                                                                                 if not p.requires_grad)}


class _Work:
    """Counts aten ops and the bytes of every fresh (non-view, not in-place) tensor over one forward and backward:
    the work of a step, which a loaded machine cannot blur (tests/ml/flux/test_flux_lora_step.py does the same
    on the tiny model)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.ops += 1
                if not func._schema.is_mutable and all(r.alias_info is None for r in func._schema.returns):
                    outer.bytes += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0]
                                       if isinstance(t, torch.Tensor))
                return out

        self.ops, self.bytes, self._mode = 0, 0, Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _rss_mb() -> float:
    """Resident memory now (after the model, adapters and optimizer are built; before the first step)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _one(impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "step", "--impl", impl, "--double", str(args.double), "--single",
           str(args.single), "--res", str(args.res), "--text", str(args.text), "--rank", str(args.rank),
           "--steps", str(args.steps)] + (["--checkpointing"] if args.checkpointing else []) + \
        (["--count"] if args.count else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_step(args) -> dict:
    """``--rounds`` rounds, each running both implementations one after the other in a fresh process, the
    order alternating (reference first in even rounds), so a load change on a shared machine hits both
    alike; ratios are per round, then the median."""
    from statistics import median

    rounds = []
    for k in range(args.rounds):
        order = ("reference", "ours") if k % 2 == 0 else ("ours", "reference")
        r = {impl: _one(impl, args) for impl in order}
        rounds.append({"first": order[0], "load": round(os.getloadavg()[0], 2),
                       "ours_ms": r["ours"]["ms_per_step"], "ref_ms": r["reference"]["ms_per_step"],
                       "ours_rss_mb": r["ours"]["peak_rss_mb"], "ref_rss_mb": r["reference"]["peak_rss_mb"],
                       "ours_setup_rss_mb": r["ours"]["setup_rss_mb"], "ref_setup_rss_mb": r["reference"]["setup_rss_mb"],
                       **{f"{who}_{k}": r[impl][k] for who, impl in (("ours", "ours"), ("ref", "reference"))
                          for k in ("ops_per_step", "fresh_tensor_mb_per_step") if k in r[impl]},
                       "ours_cpu_ms": r["ours"]["cpu_ms_per_step"], "ref_cpu_ms": r["reference"]["cpu_ms_per_step"],
                       "ratio_cpu_time": r["ours"]["cpu_ms_per_step"] / r["reference"]["cpu_ms_per_step"],
                       "ratio_time": r["ours"]["ms_per_step"] / r["reference"]["ms_per_step"],
                       "ratio_memory": r["ours"]["peak_rss_mb"] / r["reference"]["peak_rss_mb"]})
    last = r
    return {"config": {k: getattr(args, k) for k in ("double", "single", "res", "text", "rank", "steps", "checkpointing",
                                                     "rounds")},
            "lora_modules": last["ours"]["lora_modules"], "trainable": last["ours"]["trainable"],
            "transformer_params": last["ours"]["transformer_params"], "rounds": rounds,
            "median_ours_ms": median(x["ours_ms"] for x in rounds), "median_ref_ms": median(x["ref_ms"] for x in rounds),
            "median_ratio_time": median(x["ratio_time"] for x in rounds),
            "median_ratio_cpu_time": median(x["ratio_cpu_time"] for x in rounds),
            "median_ratio_memory": median(x["ratio_memory"] for x in rounds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["keys", "step"])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--text", type=int, default=32, help="T5 tokens (512 for dev in real training)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--preset", default="full", help="keys: LoRAInject layer preset")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="step: rounds of both implementations, order alternating")
    ap.add_argument("--profile", type=int, default=0, help="step --impl: print the top N torch ops of two more steps")
    ap.add_argument("--count", action="store_true",
                    help="step: also count ops and fresh-tensor MB of one more step (forward + backward)")
    ap.add_argument("--impl", choices=["ours", "reference"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.mode == "keys":
        print(json.dumps(bench_keys(args), indent=2))
    elif args.impl:
        print(json.dumps(_step_once(args)))
    else:
        print(json.dumps(bench_step(args), indent=2))


if __name__ == "__main__":
    main()
