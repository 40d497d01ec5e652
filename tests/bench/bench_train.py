"""Benchmark: our ``Trainer`` (LoRA through ``AdapterTrainable``) against a plain diffusers + peft loop.

The reference loop is what diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` does
each step: tokenize the captions, VAE-encode the pixels (``latent_dist.sample()``), CLIP-encode the
token ids (nothing cached), DDPMScheduler noise at uniform timesteps, UNet forward, MSE on epsilon,
backward, clip the LoRA gradients to norm 1, AdamW step, constant LR schedule, ``loss.item()``.
Its LoRA is peft's, added with ``unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights=
"gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``.

Ours is ``Trainer.run`` on a ``ModelHandle(bundle).with_adapter(create_adapter_set(bundle,
AdapterConfig(rank, alpha, targets={"unet": "attn-only", "text_encoder": "none"})))``, trained in
place as a one-shot ``launch.py run`` does (``AdapterTrainable(handle, in_place=True)``), with the same
optimizer settings (AdamW lr 1e-4, wd 1e-2, eps 1e-8, clip 1.0, constant schedule). Both get the
same model weights, the same pre-generated random pixel batches (seeded, in [-1, 1]) and captions,
the same precision (fp32; or bf16 weights + bf16 autocast with fp32 LoRA weights, as the example's
``--mixed_precision bf16``) and no gradient checkpointing. The script checks that both adapt the
same set of UNet modules and reports both trainable-parameter counts.

Two kinds of run (``--mode both`` does each per round):
  own    each (impl, config, round) in a fresh subprocess of this script, so its peak RSS
         (``ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated``) is its own; rounds alternate
         the order (ref, ours, ours, ref, ...) so drift of the machine hits both.
  inter  one subprocess runs both, alternating step by step (a reference step runs from ours'
         end-of-step hook, on a peft-wrapped structural copy of the UNet sharing the frozen base
         weights): the fairest time comparison on a busy machine; no memory figure.
Warmup steps are excluded from the timing; ms/step is the median over the timed steps of all
rounds, "cpu ms" the median process CPU time per step. On CPU the workers use 1 torch thread by
default (``--threads``): with more threads than free cores (a shared machine) OpenMP threads spin
at barriers and a 30 ms step can take seconds. After the timed steps each
worker counts FLOPs of one more step with ``torch.utils.flop_counter.FlopCounterMode`` (whole step
and the UNet forward+backward alone); on CUDA the UNet FLOPs give the model FLOP utilisation (MFU).

Configs:
  tiny   ``builtin:tiny-sd`` (the test model, ~1M parameters).
  sd15   the full-size SD1.5 architecture from app/ml/models/configs/sd15 with random, seeded
         weights (diffusers' default init, built with ``from_config``). No real SD1.5 tokenizer
         exists offline, so the tiny CLIP tokenizer (834 tokens) stands in; its ids are all below
         the real CLIP ``vocab_size`` (49408), so the text encoder keeps its real size and embedding
         table and no id needs clamping. The sequence length is the real 77.

    python tests/bench/bench_train.py                                   # tiny: 20 steps, res 64, batch 2
    python tests/bench/bench_train.py --config sd15                     # sd15: 3 steps (+1 warmup), res 256, batch 1
    python tests/bench/bench_train.py --config tiny,sd15 --dtype bf16
    python tests/bench/bench_train.py --config sd15 --device cuda --res 512 --batch 4 --steps 20
    python tests/bench/bench_train.py --config tiny --profile /tmp/prof  # + cProfile / torch.profiler tables

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CAPTIONS = ["a photo of a red cube on a table", "a watercolor painting of a blue bird",
            "a portrait of an old man, studio light", "a green field under a cloudy sky"]
# Defaults per config (command-line values override them).
DEFAULTS = {
    "tiny": dict(steps=20, warmup=3, res=64, batch=2, rounds=2),
    "sd15": dict(steps=3, warmup=1, res=256, batch=1, rounds=1),
}
PEFT_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
RESULT_TAG = "BENCH_RESULT "
# Dense peak TFLOP/s per GPU name fragment: (bf16/fp16 tensor core, fp32 non-tensor core).
PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100": (989.0, 67.0),
               "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "A10G": (70.0, 31.2), "4090": (165.0, 82.6)}


# ============================================================================ models and data

def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_bundle(config: str, dtype: str):
    """The same ModelBundle in every worker: seeded weights, frozen, in eval mode."""
    import torch

    from app.ml.models import load_model

    if config == "tiny":
        return load_model("builtin:tiny-sd", dtypes={"unet": dtype, "vae": dtype, "text_encoder": dtype})
    if config != "sd15":
        raise SystemExit(f"unknown config {config!r} (tiny or sd15)")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from app.ml.models.bundle import ModelBundle, freeze
    from app.ml.models.families import get_family
    from app.ml.models.tiny import CONFIGS, load_tiny_tokenizer

    cfg = CONFIGS / "sd15"
    te_config = CLIPTextConfig.from_pretrained(str(cfg / "text_encoder"))
    tokenizer = load_tiny_tokenizer()
    assert len(tokenizer) <= te_config.vocab_size, "tokenizer ids must fit the CLIP embedding table"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(json.loads((cfg / "unet/config.json").read_text()))
        torch.manual_seed(1)
        vae = AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text()))
        torch.manual_seed(2)
        te = CLIPTextModel(te_config)
    dt = _dtype(dtype)
    for m in (unet, vae, te):
        m.to(dt)
        freeze(m)
    family = get_family("sd15")
    scheduler_config = json.loads((cfg / "scheduler/scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = family.prediction_type
    return ModelBundle(family=family, denoiser=unet, vae=vae, text_encoders=(te,), tokenizers=(tokenizer,),
                       scheduler_config=scheduler_config,
                       dtypes={"unet": dt, "vae": dt, "text_encoder": dt},
                       identities={"unet": "bench-sd15-unet-seed0", "vae": "bench-sd15-vae-seed1",
                                   "text_encoder": "bench-sd15-te-seed2", "tokenizer": "tiny"},
                       source="bench:sd15-random")


def make_batches(res: int, batch: int, n: int = 4):
    """n distinct batches of seeded random pixels in [-1, 1] and captions; the steps cycle through them."""
    import torch

    g = torch.Generator().manual_seed(1234)
    out = []
    for i in range(n):
        pixels = torch.rand((batch, 3, res, res), generator=g) * 2 - 1
        captions = [CAPTIONS[(i * batch + j) % len(CAPTIONS)] for j in range(batch)]
        out.append((pixels, captions))
    return out


# ============================================================================ measurement helpers

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _flop_counter():
    """FlopCounterMode that also counts CPU flash attention (torch registers only the CUDA kernels)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)

        extra[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=extra)


def _flops_summary(counter) -> dict:
    counts = counter.get_flop_counts()
    unet = sum(counts.get("UNet2DConditionModel", {}).values())
    return {"flops_step": int(counter.get_total_flops()), "flops_unet": int(unet)}


class _Profiler:
    """cProfile + torch.profiler around a few extra steps, tables written to `folder`."""

    def __init__(self, folder: str | None, tag: str) -> None:
        self.folder = Path(folder) if folder else None
        self.tag = tag

    def __enter__(self):
        if self.folder is None:
            return self
        import cProfile

        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        self.cp = cProfile.Profile()
        self.tp = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                         + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
                                         record_shapes=False)
        self.tp.__enter__()
        self.cp.enable()
        return self

    def __exit__(self, *exc):
        if self.folder is None:
            return False
        import io
        import pstats

        self.cp.disable()
        self.tp.__exit__(*exc)
        s = io.StringIO()
        pstats.Stats(self.cp, stream=s).sort_stats("cumulative").print_stats(60)
        (self.folder / f"{self.tag}_cprofile.txt").write_text(s.getvalue())
        s = io.StringIO()
        pstats.Stats(self.cp, stream=s).sort_stats("tottime").print_stats(40)
        (self.folder / f"{self.tag}_cprofile_tottime.txt").write_text(s.getvalue())
        table = self.tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=50)
        (self.folder / f"{self.tag}_torch.txt").write_text(table)
        return False


# ============================================================================ the two implementations

def setup_reference(spec: dict, bundle, unet, device, batches):
    """diffusers' train_text_to_image_lora.py, one step at a time (no accelerate wrapper: 1 process).

    Returns (step, info): ``step()`` runs one optimizer step and returns the loss."""
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    vae, text_encoder, tokenizer = bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0]
    weight_dtype = _dtype(spec["dtype"])
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], init_lora_weights="gaussian",
                                target_modules=PEFT_TARGETS))
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # LoRA weights train in fp32, as the example does
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    adapted = sorted(n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer))
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    noise_scheduler = DDPMScheduler.from_config(dict(bundle.scheduler_config))
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
    # accelerate's mixed_precision wraps the prepared UNet's forward in autocast; the VAE and the
    # text encoder run in weight_dtype outside it
    autocast = (torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext())
    unet.train()
    scaling = vae.config.scaling_factor
    step_no = [0]

    def step() -> float:
        pixels, captions = batches[step_no[0] % len(batches)]
        step_no[0] += 1
        # the example's preprocess_train tokenizes in the (main-process) data loader, per batch
        input_ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids
        pixel_values = pixels.to(device, dtype=weight_dtype)
        latents = vae.encode(pixel_values).latent_dist.sample() * scaling
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids.to(device), return_dict=False)[0]
        with autocast:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return loss.detach().item()

    return step, dict(trainable_params=sum(p.numel() for p in lora_layers), adapted=adapted)


def run_reference(spec: dict, bundle, device, batches) -> dict:
    step, info = setup_reference(spec, bundle, bundle.unet, device, batches)
    times, cpu, losses = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = _peak_mib(device)
    counter = _flop_counter()
    with counter:
        step()
    with _Profiler(spec.get("profile"), f"ref_{spec['config']}"):
        for _ in range(spec["profile_steps"]):
            step()
        _sync(device)
    w = spec["warmup"]
    return dict(step_s=times[w:], cpu_s=cpu[w:], warmup_s=times[:w], peak_mib=peak, losses=losses,
                **info, **_flops_summary(counter))


class _MemorySource:
    """A BatchSource over pre-made pixel batches (no decoding, no latent/text cache)."""

    def __init__(self, batches, n: int) -> None:
        self.batches = batches
        self.n = n

    def iterations(self, epoch: int) -> int:
        return self.n

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1):
        import torch

        from app.ml.train.loop import Batch

        pixels, captions = self.batches[index % len(self.batches)]
        return Batch(captions=list(captions), loss_weights=torch.ones(len(captions)), pixels=pixels)


def setup_ours(spec: dict, bundle, device, batches, on_step):
    """Returns (run, info): ``run(n)`` trains n steps with a fresh Trainer over the same adapter;
    ``on_step()`` is called at the end of every step (from the loop's metric hook)."""
    from app.ml.adapters import AdapterConfig, create_adapter_set
    from app.ml.handle import ModelHandle
    from app.ml.train.loop import Hooks, Trainer, TrainSettings
    from app.ml.train.trainables import AdapterTrainable

    config = AdapterConfig(rank=spec["rank"], alpha=spec["alpha"], targets={"unet": "attn-only", "text_encoder": "none"})
    aset = create_adapter_set(bundle, config)
    handle = ModelHandle(bundle).with_adapter(aset)
    # as in `launch.py run`: TrainLoop is the last reader of LoRAInject's output, so the executor
    # lets it train that adapter in place (an editor session, which keeps outputs, trains a copy)
    trainable = AdapterTrainable(handle, in_place=True)
    adapted = sorted(e.name for e in trainable.adapter.entries() if e.component == "unet")
    opt = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-2, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999,
           "schedule": "constant", "warmup": 0}
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    losses: list[float] = []

    def metric(**values):
        if "step" in values:
            losses.append(values["loss"])
            on_step()

    def run(n: int) -> None:
        settings = TrainSettings(epochs=1, max_steps=n, seed=0, train_dtype=spec["dtype"], clip_grad_norm=1.0,
                                 gradient_checkpointing=False)
        Trainer(handle, trainable, _MemorySource(batches, n), opt, settings, Path(workdir),
                Hooks(metric=metric), device=device).run()

    return run, dict(trainable_params=trainable.adapter.num_parameters(), adapted=adapted, losses=losses)


def run_ours(spec: dict, bundle, device, batches) -> dict:
    stamps: list[tuple[float, float]] = []

    def on_step():
        _sync(device)
        stamps.append((time.perf_counter(), time.process_time()))

    run, info = setup_ours(spec, bundle, device, batches, on_step)
    n = spec["warmup"] + spec["steps"]
    start = (time.perf_counter(), time.process_time())
    run(n)
    marks = [start] + stamps[:n]
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    peak = _peak_mib(device)
    counter = _flop_counter()
    with counter:
        run(1)
    with _Profiler(spec.get("profile"), f"ours_{spec['config']}"):
        if spec["profile_steps"]:
            run(spec["profile_steps"])
        _sync(device)
    w = spec["warmup"]
    info["losses"] = info["losses"][:n]
    return dict(step_s=times[w:], cpu_s=cpu[w:], warmup_s=times[:w], peak_mib=peak, **info, **_flops_summary(counter))


def _shared_copy(module):
    """A structural copy of `module` whose parameters and buffers are the same tensors (no extra memory)."""
    import copy

    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def run_interleaved(spec: dict, bundle, device, batches) -> dict:
    """Both loops in one process, alternating step by step: ours' step, then (from its end-of-step
    hook) one reference step on a peft-wrapped UNet that shares ours' frozen base weights. Load on the
    machine then hits both alike. Timing only (the process holds both)."""
    for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
        m.to(device)
    ref_step, ref_info = setup_reference(spec, bundle, _shared_copy(bundle.unet), device, batches)
    rec = {"ours": [], "ref": [], "ours_cpu": [], "ref_cpu": []}
    mark = [None]

    def on_step():
        _sync(device)
        now, cpu = time.perf_counter(), time.process_time()
        if mark[0] is not None:
            rec["ours"].append(now - mark[0][0])
            rec["ours_cpu"].append(cpu - mark[0][1])
        t0, c0 = time.perf_counter(), time.process_time()
        ref_step()
        _sync(device)
        rec["ref"].append(time.perf_counter() - t0)
        rec["ref_cpu"].append(time.process_time() - c0)
        mark[0] = (time.perf_counter(), time.process_time())

    run, ours_info = setup_ours(spec, bundle, device, batches, on_step)
    mark[0] = (time.perf_counter(), time.process_time())
    run(spec["warmup"] + spec["steps"])
    w = spec["warmup"]
    return dict(ours=dict(step_s=rec["ours"][w:], cpu_s=rec["ours_cpu"][w:], adapted=ours_info["adapted"]),
                ref=dict(step_s=rec["ref"][w:], cpu_s=rec["ref_cpu"][w:], adapted=ref_info["adapted"]))


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    t0 = time.perf_counter()
    bundle = build_bundle(spec["config"], spec["dtype"])
    build_s = time.perf_counter() - t0
    batches = make_batches(spec["res"], spec["batch"])
    rss_built = _rss_now_mib()
    fn = {"ours": run_ours, "ref": run_reference, "interleaved": run_interleaved}[spec["impl"]]
    out = fn(spec, bundle, device, batches)
    out.update(build_s=build_s, rss_after_build_mib=rss_built, threads=torch.get_num_threads(),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    return out


# ============================================================================ driver

def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {spec['impl']}/{spec['config']} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall_s"] = time.perf_counter() - t0
    return result


def _peak_tflops(device_name: str, dtype: str, override: float | None) -> float | None:
    if override:
        return override
    for key, (half, single) in PEAK_TFLOPS.items():
        if key in device_name:
            return half if dtype == "bf16" else single
    return None


def _fmt_flops(x: float) -> str:
    return f"{x / 1e12:.3f} T" if x >= 1e11 else f"{x / 1e9:.3f} G"


def _summarise(rs: list[dict], spec: dict, args) -> dict:
    steps = [t for r in rs for t in r["step_s"]]
    cpu = [t for r in rs for t in r.get("cpu_s", [])]
    med = statistics.median(steps)
    first = rs[0]
    out = dict(ms=1000 * med, sps=1 / med, cpu_ms=1000 * statistics.median(cpu) if cpu else float("nan"),
               spread=(1000 * min(steps), 1000 * max(steps)), n=len(steps), adapted=first["adapted"])
    if "peak_mib" in first:
        peak_tf = (_peak_tflops(first["device_name"], spec["dtype"], args.peak_tflops)
                   if spec["device"] == "cuda" else None)
        out.update(peak=max(r["peak_mib"] for r in rs), base=max(r["rss_after_build_mib"] for r in rs),
                   params=first["trainable_params"], flops_step=first["flops_step"], flops_unet=first["flops_unet"],
                   mfu=(first["flops_unet"] / med / (peak_tf * 1e12)) if peak_tf else None,
                   device=first["device_name"], threads=first["threads"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="tiny, sd15, or a comma list (tiny,sd15)")
    ap.add_argument("--steps", type=int, help="timed steps per round (tiny 20, sd15 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (tiny 3, sd15 1)")
    ap.add_argument("--batch", type=int, help="batch size (tiny 2, sd15 1)")
    ap.add_argument("--res", type=int, help="square resolution in pixels (tiny 64, sd15 256)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, help="subprocess pairs per config, order alternating (tiny 2, sd15 1)")
    ap.add_argument("--mode", choices=("both", "separate", "interleaved"), default="both",
                    help="separate: one subprocess per (impl, config, round): time, peak memory, FLOPs; "
                         "interleaved: one subprocess alternating ours/ref step by step: time only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads per worker (default 1 on cpu: robust when the machine is shared, "
                         "where OpenMP threads spin at barriers; 0 = torch's default)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--impl", choices=("both", "ours", "ref"), default="both", help="separate mode only")
    ap.add_argument("--peak-tflops", type=float, help="GPU peak for MFU (default: from the GPU name)")
    ap.add_argument("--profile", metavar="DIR", help="write cProfile and torch.profiler tables of extra steps here")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    impls = ["ref", "ours"] if args.impl == "both" else [args.impl]
    rows, raw = [], {}
    for config in [c.strip() for c in args.config.split(",") if c.strip()]:
        if config not in DEFAULTS:
            raise SystemExit(f"unknown config {config!r}; choose tiny or sd15")
        d = DEFAULTS[config]
        threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
        spec = dict(config=config, dtype=args.dtype, device=args.device, rank=args.rank, alpha=args.alpha, threads=threads,
                    steps=args.steps or d["steps"], warmup=d["warmup"] if args.warmup is None else args.warmup,
                    res=args.res or d["res"], batch=args.batch or d["batch"],
                    profile=args.profile, profile_steps=args.profile_steps if args.profile else 0)
        rounds = args.rounds or d["rounds"]
        results: dict[str, list[dict]] = {i: [] for i in impls}
        inter: dict[str, list[dict]] = {"ref": [], "ours": []}
        for r in range(rounds):
            if args.mode in ("both", "separate"):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    print(f"[{config}] round {r + 1}/{rounds}: {impl} (own process) ...", flush=True)
                    res = _spawn(dict(spec, impl=impl, profile=spec["profile"] if r == 0 else None,
                                      profile_steps=spec["profile_steps"] if r == 0 else 0))
                    results[impl].append(res)
                    print(f"    median {1000 * statistics.median(res['step_s']):.1f} ms/step "
                          f"(steps {', '.join(f'{1000 * t:.0f}' for t in res['step_s'][:8])}), peak {res['peak_mib']:.0f} MiB, "
                          f"process {res['wall_s']:.0f} s (model build {res['build_s']:.1f} s)", flush=True)
            if args.mode in ("both", "interleaved"):
                print(f"[{config}] round {r + 1}/{rounds}: ours and ref interleaved in one process ...", flush=True)
                res = _spawn(dict(spec, impl="interleaved", profile=None, profile_steps=0))
                for impl in ("ref", "ours"):
                    inter[impl].append(res[impl])
                print("    median ms/step " + ", ".join(
                    f"{k} {1000 * statistics.median(res[k]['step_s']):.1f}" for k in ("ref", "ours"))
                    + f", process {res['wall_s']:.0f} s", flush=True)
        raw[config] = {"spec": spec, "separate": results, "interleaved": inter}
        summary = {impl: _summarise(rs, spec, args) for impl, rs in results.items() if rs}
        isummary = {impl: _summarise(rs, spec, args) for impl, rs in inter.items() if rs}
        rows.append((config, spec, summary, isummary))

    mem_label = "peak alloc MiB" if args.device == "cuda" else "peak RSS MiB"
    print()
    header = (f"{'impl':<6} {'run':<6} {'config':<6} {'res':>4} {'batch':>5} {'dtype':<5} {'ms/step':>9} "
              f"{'min-max ms':>17} {'cpu ms':>9} {'steps/s':>8} {mem_label:>14} {'RSS built':>10} {'MFU':>6} "
              f"{'t ours/ref':>10} {'mem ours/ref':>12}")
    print(header)
    print("-" * len(header))
    for config, spec, summary, isummary in rows:
        for kind, summ in (("own", summary), ("inter", isummary)):
            ref = summ.get("ref")
            for impl, s in summ.items():
                rt = f"{s['ms'] / ref['ms']:.3f}" if ref and impl == "ours" else ""
                rm = f"{s['peak'] / ref['peak']:.3f}" if ref and impl == "ours" and "peak" in s else ""
                mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "-"
                peak = f"{s['peak']:.0f}" if "peak" in s else "-"
                base = f"{s['base']:.0f}" if "base" in s and spec["device"] == "cpu" else "-"
                print(f"{impl:<6} {kind:<6} {config:<6} {spec['res']:>4} {spec['batch']:>5} {spec['dtype']:<5} "
                      f"{s['ms']:>9.1f} {s['spread'][0]:>8.1f}-{s['spread'][1]:<8.1f} {s['cpu_ms']:>9.1f} "
                      f"{s['sps']:>8.3f} {peak:>14} {base:>10} {mfu:>6} {rt:>10} {rm:>12}")
    print("(own: one fresh process per impl, order alternating per round; inter: both in one process, "
          "alternating step by step; cpu ms: process CPU time per step, all threads)")
    print()
    for config, spec, summary, isummary in rows:
        s0 = next(iter(summary.values()), None)
        if s0:
            print(f"[{config}] device {s0['device']}, {s0['threads']} threads; timed steps per impl: "
                  + ", ".join(f"{k}={v['n']}" for k, v in summary.items()))
            for impl, s in summary.items():
                print(f"[{config}] {impl:<4} trainable parameters {s['params']:,}; FLOPs per step: UNet fwd+bwd "
                      f"{_fmt_flops(s['flops_unet'])}, whole step {_fmt_flops(s['flops_step'])}")
        both = summary if len(summary) == 2 else isummary
        if len(both) == 2:
            a, b = set(both["ours"]["adapted"]), set(both["ref"]["adapted"])
            same = "identical" if a == b else f"DIFFERENT (only ours: {sorted(a - b)[:4]}, only ref: {sorted(b - a)[:4]})"
            print(f"[{config}] adapted UNet modules: ours {len(a)}, ref {len(b)} -> {same}")
        if len(summary) == 2 and summary["ref"]["flops_unet"]:
            print(f"[{config}] FLOPs ours/ref: UNet {summary['ours']['flops_unet'] / summary['ref']['flops_unet']:.4f}, "
                  f"whole step {summary['ours']['flops_step'] / summary['ref']['flops_step']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": raw}, indent=1, default=str))


if __name__ == "__main__":
    main()
