"""The small, explicit set of types a node input or output can have.

Sockets carry engine objects between nodes and are linked on the canvas; widgets are params edited
inside the node and stored in the recipe. There is deliberately no "any" type: a link is valid only
between identical socket types, so an incompatible link is refused when it is drawn.
"""

SOCKET_TYPES = {
    "MODEL": "a base model handle (weights plus any adapters patched in while a consumer runs)",
    "DATASET": "one or more concepts: image files, captions, masks and their settings",
    "BUCKETS": "aspect-ratio buckets and the batches drawn from them",
    "OPTIMIZER": "an optimizer and learning-rate schedule recipe",
    "OBJECTIVE": "a training objective: DDPM noise (epsilon / v) or flow matching, with its timesteps and loss",
    "TRAINED": "the result of a training run: history, backups and output paths",
    "IMAGES": "generated or preview images",
    "LORA": "a LoRA/LyCORIS adapter read from a file or made by a LoRA tool, with its metadata",
}

WIDGET_TYPES = {
    "INT": "a whole number",
    "FLOAT": "a number",
    "STRING": "text",
    "BOOL": "true or false",
    "ENUM": "one of a fixed list of choices",
    "PATH": "a file or folder path (stored relative to the recipe where possible)",
}

# Colours for the editor, one per socket type (RGB).
SOCKET_COLOURS = {
    "MODEL": (180, 120, 255),
    "DATASET": (90, 200, 120),
    "BUCKETS": (70, 170, 220),
    "OPTIMIZER": (240, 170, 60),
    "OBJECTIVE": (240, 130, 170),
    "TRAINED": (230, 90, 90),
    "IMAGES": (240, 220, 90),
    "LORA": (200, 150, 255),
}


def is_socket_type(name: str) -> bool:
    return name in SOCKET_TYPES


def is_widget_type(name: str) -> bool:
    return name in WIDGET_TYPES


def can_link(output_type: str, input_type: str) -> bool:
    """Whether an output of one type may feed an input of another: only identical socket types."""
    return output_type == input_type and output_type in SOCKET_TYPES
