"""Where the weights live while a job runs; results are identical whichever placement is used.

- `placement.py`: the `Placement` protocol and `ResidentPlacement` (everything on the device).
- `offload.py`: `OffloadPlacement` (whole components) and `BlockSwapPlacement` (transformer blocks).
- `weight_swap.py`: moving a module's weights between host and device copies.
- `memory.py`: free RAM / device memory probes and checks before allocating.
- `memory_plan.py`: the cost model and the choice of placement from the free memory.
- `vae_tiling.py`: tiled VAE decode/encode for outputs too large for one piece.
"""

# The memory modes, spelled once (torch-free, so the CLI and node front ends can list them cheaply).
MEMORY_MODES = ("auto", "resident", "offload", "block_swap")
