"""The chain's stages, each one verb with its typed result: calibrate and quantize (chain.py), build
the engines (build.py), compare and judge them (compare.py, with the peers' plug-ins in peers.py),
the gated mixed-precision search (mixed.py), SlimFlow distillation (distill.py) and the TensorRT
plan on a GPU host (gpu.py)."""
