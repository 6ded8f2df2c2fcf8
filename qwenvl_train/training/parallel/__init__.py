"""How a plain QwenVL becomes a pipeline x tensor x data layout under DeepSpeed.

parallelize.py  the one call the trainer makes (`parallelize(model, cfg) -> Parallel`)
config.py       ParallelConfig (the `parallel` config group) and every layout rule
topology.py     sizes on a world (the world-size check), DeepSpeed's 3D grid
tensor_parallel.py, pipeline.py, partition.py   Megatron-style TP, pipeline stages and
                their compute-balanced split; which modules they touch is the registry's
                (model/groups.py)
consolidate.py  full weights out of ZeRO-3 partitions
engine.py       distributed init and the generated DeepSpeed config
"""
