"""The Dear PyGui editor, generated from node specs.

Pure modules (no dearpygui import, unit-testable): commands (undo/redo on the Graph model),
document (a recipe being edited), search, runstate (events -> per-node run state), embedded
(recipes inside LoRA/PNG outputs), settings (recent files, autosave). The Dear PyGui side:
theme, widgets, canvas, previews, panels, dialogs, editor (all callbacks) and main (the render
loop). The editor never imports torch: runs go to the worker process (app.engine.client).
"""
