#!/usr/bin/env bash
# One device call for structured pruning: prune dit-s (and the SD-1.5 UNet) to half their FLOPs on the
# machine's CPU, then time the unpruned and pruned models on its GPU (fp16) at two batch sizes.
# The GPU image lacks diffusers: carry its wheel in .whl/ (see the device README). Results land in $OUT.
# Stage time limits: DIT_S, UNET_S seconds.
set -u
source benchmarks/gpu_env.sh
stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cpu threads', torch.get_num_threads())" | tee -a "$OUT/machine.txt"
stage "dit-s: flops=0.5 ranked by this CPU's latency; GPU fp16 timings"
timeout "${DIT_S:-240}" python3 benchmarks/prune_speed.py --models dit-s --rank-by latency --device cuda \
    --dtype float16 --batch 2,64 --repeats 20 2>&1 | tee "$OUT/prune_dit_s.txt" | grep -v Warning
stage "sd15-unet: flops=0.5 ranked by FLOPs; GPU fp16 timings"
timeout "${UNET_S:-300}" python3 benchmarks/prune_speed.py --models sd15-unet --device cuda --dtype float16 \
    --batch 2,8 --repeats 10 --rounds 1 2>&1 | tee "$OUT/prune_sd15.txt" | grep -v Warning
stage "done"
