"""The built-in demo: a drawn layered scene and the job that runs the layer engine on it (no weights needed).

- `scene.py`: the procedurally drawn sample scene (`sample_stack`, `sample_image`, `DEFAULT_SIZE`).
- `job.py`: `run_demo` (edit, flatten, write PSDs and PNGs, check them) and its `DemoReport`.
"""
