"""Multi-process and multi-node training on the existing engines: torchrun, accelerate, DeepSpeed, torch FSDP2.

  * ``launch``      ``lmforge train CONFIG --nproc-per-node N ...`` re-executes itself through torchrun;
  * ``checks``      config rules for impossible combinations (run at config load, before any process starts);
  * ``strategy``    process group + accelerate state for ddp / fsdp / deepspeed, and the check after set-up
                    that the strategy running is the one the config asked for;
  * ``zero``        DeepSpeed presets (zero1, zero2, zero3, zero3_offload) or a user's JSON;
  * ``ranks``       rank helpers (rank-0-first data preparation);
  * ``consolidate`` sharded FSDP / ZeRO checkpoints -> a plain HF model or adapter.
"""
