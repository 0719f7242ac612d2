"""The recurrent layers: the supported classes declared once (:mod:`.registry`), the rule of
each cell type (:mod:`.rules`), the autograd Function that runs it on a whole module call
(:mod:`.function`) with its step loops compiled for CPUs (:mod:`.cpu_loops`,
``cpu_kernels.c``) and GPUs (:mod:`.fused_loops`), and the modules' DeepLIFT forwards and
checks (:mod:`.modules`)."""
