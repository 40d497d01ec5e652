"""TrainLoop combinations the run would refuse, said by ``validate`` before anything loads.

A full fine-tune (no LoRAInject or Embedding on TrainLoop's model wire) cannot train weights LoadModel
stores quantized (nf4 / int8 / fp8 are frozen storage: QLoRA trains an adapter on top), and the fused
backward pass steps each parameter inside backward, so it cannot accumulate gradients. TrainLoop
refuses both when it starts; a recipe shared as a file should say so when it is checked. Pure graph
walking: validation never imports torch.
"""

from __future__ import annotations

from app.graph.problems import Problem

# Nodes that pass a MODEL through on their "model" input; the trainable ones make TrainLoop train them.
TRAINABLE = ("LoRAInject", "Embedding")
PASS_THROUGH = ("ApplyLoRA", "LoadEmbedding", "LoRAInject", "Embedding")


def _params(graph, registry, node) -> dict:
    spec = registry.get(node.type)
    params = spec.default_params() if spec is not None else {}
    params.update({k: v for k, v in node.params.items() if k in params})
    return params


def _upstream(graph, node_id: str):
    """(LoadModel node or None, whether a trainable adapter was passed): walking TrainLoop's model wire."""
    trainable, seen = False, set()
    nid = node_id
    while nid not in seen:
        seen.add(nid)
        links = graph.links_into(nid, "model")
        if not links:
            return None, trainable
        src = graph.nodes.get(links[0].from_node)
        if src is None:
            return None, trainable  # a dangling link: reported by the link checks
        if src.type == "LoadModel":
            return src, trainable
        if src.type not in PASS_THROUGH:
            return None, trainable  # e.g. another TrainLoop: what it hands on is its own business
        trainable = trainable or src.type in TRAINABLE
        nid = src.id
    return None, trainable


def check_training(graph, registry) -> list[Problem]:
    problems: list[Problem] = []
    for node in graph.nodes.values():
        spec = registry.get(node.type)
        if node.type != "TrainLoop" or spec is None or node.version != spec.version:
            continue
        p = _params(graph, registry, node)
        accumulation = p.get("grad_accumulation", 1)
        if p.get("fused_backward") is True and isinstance(accumulation, int) and accumulation > 1:
            problems.append(Problem(node.id, node.label(), "fused_backward steps each parameter inside backward, so "
                                    f"it cannot accumulate gradients (grad_accumulation = {p['grad_accumulation']}): "
                                    "set grad_accumulation to 1, or turn fused_backward off"))
        load, trainable = _upstream(graph, node.id)
        if load is None or trainable:
            continue
        lp = _params(graph, registry, load)
        for trains, quant, what in ((p.get("train_unet", True), "denoiser_quant", "the UNet / transformer"),
                                    (p.get("train_text_encoder", False), "text_encoder_quant", "the text encoder(s)")):
            fmt = lp.get(quant, "none")
            if trains is True and isinstance(fmt, str) and fmt != "none":
                problems.append(Problem(node.id, node.label(), f"a full fine-tune of {what} (no LoRAInject on the "
                                        f"model wire), but {load.label()} (node {load.id}) stores it quantized "
                                        f"({quant} = {fmt}), which cannot train: set {quant} to none, or add a "
                                        "LoRAInject to train an adapter on top (QLoRA)"))
    return problems
