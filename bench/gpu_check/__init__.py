"""One prepared GPU check: what a ComfyUI user and a trainer meet, measured on one GPU (issue 23).

    python -m bench.gpu_check                  # every leg at full size on the GPU (< 8 min on an H100)
    python -m bench.gpu_check --toy            # every leg on the CPU at tiny size, in seconds
    python -m bench.gpu_check --legs training  # some legs only

Legs (one module each): :mod:`.leg_sampling` (ComfyUI end to end), :mod:`.leg_decode` (VAE decode,
also under an 8 GB cap), :mod:`.leg_lowvram` (sampling and decode under the cap, then unload),
:mod:`.leg_training` (the trainers' own steps beside ``bench.plan``'s prediction).  The first three
boot ComfyUI (``COMFYUI_PATH``) as a custom-node host with this pack; the last needs the training
libraries (diffusers, peft, accelerate).  Results go to ``bench/results/gpu_check.json`` and the
section between the GPU-CHECK markers of ``bench/README.md`` (:mod:`.report`).  All weights are
random: cost, never quality.  On a CPU memory is reported as not measured, never estimated.
"""
