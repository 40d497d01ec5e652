"""Model nodes: load a base model, patch adapters in, sample images, save results."""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

PENDING = "is declared but not implemented yet: it arrives with the model issue"
DTYPES = ["fp32", "fp16", "bf16"]
SAMPLERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc"]


@node(type="LoadModel", category="model",
      description="Loads a base model: a diffusers folder, a single-file .safetensors checkpoint "
                  "(A1111/Civitai layout) or a built-in tiny model for demos and tests.",
      inputs=[
          Path("source", "builtin:tiny-sd", kind="file_or_folder",
               tooltip="a diffusers folder, a .safetensors checkpoint, or builtin:tiny-sd / builtin:tiny-sdxl"),
          Enum("family", ["auto", "sd15", "sd2", "sd2-v", "sdxl"],
               tooltip="auto: detected from the checkpoint's keys; sd2-v: SD 2.x 768 with v-prediction"),
          Path("vae", "", kind="file_or_folder", optional=True, tooltip="a separate VAE to use instead"),
          Enum("unet_dtype", DTYPES, "fp32", tooltip="weight precision of the UNet"),
          Enum("text_encoder_dtype", DTYPES, "fp32", tooltip="weight precision of the text encoder(s)"),
          Enum("vae_dtype", DTYPES, "fp32", tooltip="weight precision of the VAE (the SDXL VAE overflows in fp16)"),
      ],
      outputs=[Output("model", "MODEL")])
def load_model(ctx, **params):
    raise NotImplementedError(f"LoadModel {PENDING}")


@node(type="LoRAInject", category="model",
      description="Adds a trainable adapter (LoRA, LoCon, LoHa, LoKr or DoRA) to a model. The base model is "
                  "never changed: the adapter is patched in only while a consumer runs.",
      inputs=[
          Socket("model", "MODEL"),
          Enum("algorithm", ["lora", "locon", "loha", "lokr", "dora"]),
          Int("rank", 16, min=1, max=1024, tooltip="adapter rank (network dim)"),
          Float("alpha", 1.0, min=0.0, max=4096.0, tooltip="the applied scale is alpha / rank"),
          Int("conv_rank", 0, min=0, max=1024, tooltip="rank for conv layers (LoCon); 0 = same as rank"),
          Float("conv_alpha", 1.0, min=0.0, max=4096.0),
          Float("dropout", 0.0, min=0.0, max=1.0, tooltip="dropout on the adapter's hidden features"),
          Float("rank_dropout", 0.0, min=0.0, max=1.0, advanced=True),
          Float("module_dropout", 0.0, min=0.0, max=1.0, advanced=True),
          Int("lokr_factor", -1, min=-1, max=64, advanced=True, tooltip="LoKr factor; -1 = automatic"),
          Enum("unet_layers", ["attn-mlp", "attn-only", "full", "custom", "none"],
               tooltip="which UNet layers get adapters"),
          String("unet_custom", "", tooltip="layer names or a regex, when unet_layers is custom"),
          Enum("text_encoder_layers", ["none", "attn-only", "attn-mlp", "full", "custom"],
               tooltip="train adapters in the text encoder(s) too"),
          String("text_encoder_custom", ""),
          Path("init_from", "", optional=True, tooltip="continue training from an existing LoRA file"),
      ],
      outputs=[Output("model", "MODEL")])
def lora_inject(ctx, **params):
    raise NotImplementedError(f"LoRAInject {PENDING}")


@node(type="Sample", category="sampling", side_effect=True,
      description="Generates images from a model; they are written to the workspace with the recipe in "
                  "their PNG text and shown as a preview.",
      inputs=[
          Socket("model", "MODEL"),
          String("prompt", "a photo", multiline=True, optional=False, tooltip="one prompt per line"),
          String("negative_prompt", "", multiline=True),
          Int("width", 512, min=64, max=4096, step=8),
          Int("height", 512, min=64, max=4096, step=8),
          Int("steps", 30, min=1, max=500),
          Float("cfg", 7.0, min=0.0, max=50.0, tooltip="classifier-free guidance scale"),
          Int("seed", -1, min=-1, max=2**63 - 1, tooltip="-1 = random (the seed used is recorded)"),
          Enum("sampler", SAMPLERS, "dpmpp_2m"),
          Float("lora_strength", 1.0, min=-10.0, max=10.0),
      ],
      outputs=[Output("images", "IMAGES")])
def sample(ctx, **params):
    raise NotImplementedError(f"Sample {PENDING}")


@node(type="Save", category="output", side_effect=True,
      description="Writes the adapter or full model, atomically, with the recipe in its metadata.",
      inputs=[
          Socket("model", "MODEL"),
          Path("path", "", kind="file", tooltip="where to write (e.g. output/my_lora.safetensors)"),
          Enum("what", ["adapter", "full_model"]),
          Enum("layout", ["kohya", "peft", "comfyui", "single_file", "diffusers_folder"],
               tooltip="kohya: what A1111 and ComfyUI read; peft: diffusers load_lora_weights; full models: "
                       "single_file or diffusers_folder"),
          Enum("dtype", ["fp16", "bf16", "fp32"]),
          Enum("if_exists", ["add_suffix", "overwrite"], tooltip="never overwrite unless chosen"),
      ],
      outputs=[])
def save(ctx, **params):
    raise NotImplementedError(f"Save {PENDING}")
