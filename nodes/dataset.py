"""Dataset nodes: folders of images and captions become training batches."""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

PENDING = "is declared but not implemented yet: it arrives with the dataset issue"


@node(type="Concept", category="dataset",
      description="A folder of training images with captions (and optional masks); kohya-style "
                  "'N_name' subfolders give N repeats.",
      inputs=[
          Path("folder", kind="folder", tooltip="the folder of images (png, jpg, webp, bmp); subfolders are included"),
          String("name", tooltip="concept name; used as the caption when one is missing and that is chosen below"),
          Enum("prompt_source", ["per_image", "concept_file", "filename"],
               tooltip="per_image: <stem>.txt beside each image (one random line per epoch); concept_file: one "
                       "text file for all; filename: 'sunset_beach.png' gives 'sunset beach'"),
          Path("caption_file", kind="file", optional=True, tooltip="the text file used when prompt_source is concept_file"),
          Enum("missing_caption", ["concept_name", "empty", "error"],
               tooltip="what an image without a caption gets; the preview lists them either way"),
          Enum("balancing", ["repeats", "samples"], tooltip="repeat each image, or draw a fixed number per epoch"),
          Float("repeats", 1.0, min=0.0, max=10000.0, tooltip="times each image is seen per epoch (fractions allowed)"),
          Int("samples_per_epoch", 100, min=1, max=10_000_000, tooltip="images drawn per epoch when balancing by samples"),
          Float("loss_weight", 1.0, min=0.0, max=100.0, tooltip="scales this concept's loss (e.g. 0.5 for prior images)"),
          Enum("concept_type", ["standard", "validation", "prior"],
               tooltip="validation: used only for validation loss; prior: regularisation images"),
          Int("keep_tags", 0, min=0, max=1000, tooltip="leading tags never shuffled or dropped"),
          Bool("shuffle_tags", False, tooltip="shuffle tags after the kept ones, every epoch"),
          Float("tag_dropout", 0.0, min=0.0, max=1.0, tooltip="probability of dropping each tag"),
          Float("caption_dropout", 0.0, min=0.0, max=1.0, tooltip="probability of training with an empty caption"),
          String("delimiter", ",", tooltip="separates tags in a caption"),
          Enum("on_bad_image", ["skip", "error"],
               tooltip="skip corrupt or unreadable images (they are listed), or stop before training"),
      ],
      outputs=[Output("dataset", "DATASET")])
def concept(ctx, **params):
    raise NotImplementedError(f"Concept {PENDING}")


@node(type="Augment", category="dataset",
      description="Random image augmentation, redrawn every epoch from (seed, epoch, image).",
      inputs=[
          Socket("dataset", "DATASET"),
          Enum("flip", ["random", "off", "always"], tooltip="horizontal flip"),
          Float("rotation", 0.0, min=0.0, max=180.0, tooltip="maximum rotation in degrees"),
          Bool("crop_jitter", True, tooltip="random crop offset instead of a centred crop"),
          Float("brightness", 0.0, min=0.0, max=1.0, tooltip="maximum brightness change"),
          Float("contrast", 0.0, min=0.0, max=1.0, tooltip="maximum contrast change"),
          Float("saturation", 0.0, min=0.0, max=1.0, tooltip="maximum saturation change"),
          Float("hue", 0.0, min=0.0, max=0.5, tooltip="maximum hue shift (fraction of the colour wheel)"),
          Enum("mode", ["random", "fixed"], tooltip="random: a new draw up to the maximum; fixed: always the maximum"),
          String("resolution", "", tooltip="override the bucketing resolution for this dataset (e.g. 768)"),
          Int("seed", 0, min=0, max=2**31 - 1, tooltip="draws are a pure function of (seed, epoch, image)"),
      ],
      outputs=[Output("dataset", "DATASET")])
def augment(ctx, **params):
    raise NotImplementedError(f"Augment {PENDING}")


def _bucketer_v1_to_v2(params: dict) -> dict:
    """v1 took one integer resolution and a bucketing flag; v2 takes a resolution string (a list
    for multi-resolution, or WxH) and a bucketing mode."""
    if "resolution" in params and isinstance(params["resolution"], int) and not isinstance(params["resolution"], bool):
        params["resolution"] = str(params["resolution"])
    if "enable_bucketing" in params:
        params["bucketing"] = "on" if params.pop("enable_bucketing") else "off"
    return params


@node(type="Bucketer", version=2, category="dataset",
      description="Groups images into aspect-ratio buckets at equal pixel count and forms batches within a "
                  "bucket. Leftovers are reported by name, never dropped silently.",
      migrations={1: _bucketer_v1_to_v2},
      inputs=[
          Socket("datasets", "DATASET", multi=True, tooltip="one or more datasets; each keeps its own settings"),
          Socket("model", "MODEL", optional=True, tooltip="used only to pick the quantization of its family"),
          String("resolution", "512", optional=False,
                 tooltip="target resolution: '512', a list '512,768,1024' (multi-resolution) or a fixed 'WxH'"),
          Enum("bucketing", ["on", "off"], tooltip="off: square centre crops at the resolution"),
          Enum("aspects", ["full", "moderate", "square"],
               tooltip="full: 1:1 to 1:4 and transposes; moderate: up to 1:2; square: 1:1 only"),
          Int("quantization", 0, min=0, max=256, tooltip="round sizes to this; 0 = from the model family "
                                                         "(8 for SD1.x/2.x, 64 for SDXL/Flux)"),
          Bool("no_upscale", False, tooltip="never upscale: small images get a smaller bucket"),
          Int("batch_size", 1, min=1, max=1024, tooltip="images per batch (all from one bucket)"),
          Enum("leftovers", ["drop", "repeat"],
               tooltip="images that cannot fill a batch: drop them (listed by name) or fill by repetition"),
      ],
      outputs=[Output("buckets", "BUCKETS")])
def bucketer(ctx, **params):
    raise NotImplementedError(f"Bucketer {PENDING}")


@node(type="Cache", category="dataset",
      description="Encodes images to latents and captions to text embeddings once, on disk, keyed by content; "
                  "augmentation stops being random here unless several variations are cached.",
      inputs=[
          Socket("model", "MODEL"),
          Socket("buckets", "BUCKETS"),
          Path("folder", "", kind="folder", optional=True, tooltip="cache folder (default: the workspace's cache/)"),
          Int("variations", 1, min=1, max=64, tooltip="augmented draws cached per image; epoch e uses e mod N"),
          Bool("cache_text", True, tooltip="cache text-encoder outputs (only for encoders not being trained)"),
      ],
      outputs=[Output("buckets", "BUCKETS")])
def cache(ctx, **params):
    raise NotImplementedError(f"Cache {PENDING}")
