"""The built-in node catalogue: one module per concern. Adding a node type = adding a function
with the @node decorator to one of these modules (or a new module); the editor, validation and
`launch.py nodes` pick it up from its spec. Modules here must not import torch at module level.
"""
