"""Device-memory tools for training big models on small GPUs.

* ``quant``: frozen Linear layers stored as fp8 (pure torch) or nf4/int8 (bitsandbytes), computed
  in the input's dtype, so adapters (QLoRA) train on top of them.
* ``swap``: block swap - N blocks of a ModuleList resident, the rest streamed in forward and backward.
* ``offload``: saved activations kept in host memory during backward.
* ``plan``: predicted peak device memory of a training recipe and the cheapest changes that fit it.

The modules are self-contained: LoadModel / TrainLoop wire them in.
"""
