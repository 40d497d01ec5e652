"""Pure graph data: socket types, node specs, the Graph model, recipe files and validation.

Nothing here imports torch or dearpygui: the editor process and the fast CLI commands use it.
"""
