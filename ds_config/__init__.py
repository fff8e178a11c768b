"""DeepSpeed presets (zero2, zero3 and their CPU-offload variants), shipped in the wheel as sftkit.ds_config."""
