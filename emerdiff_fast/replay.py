"""The fast backend's batching-only mode (FastOptions(share_attention=False)): the
reference algorithm with wider batches. The unmodulated run records Q and K once; then
`run.chunk` modulated members per UNet call replay them (benchmarks/waterfall.py's
"batching alone" row, against which shared attention is measured)."""
from __future__ import annotations

import torch

from .attention import Modulation, ReferenceProcessor, RunState, installed, make_processors
from .batching import chunk_plan, decode_pairs, work_units
from .run import Run
from .sampling import Trajectory, denoise, reference_run
from .timing import timed


def difference_maps(run: Run, traj: Trajectory, masks: torch.Tensor, timings: dict) -> torch.Tensor:
    state = RunState(mode="record", modulated_layer=run.modulated_layer)
    plan = chunk_plan(masks.shape[0], run.chunk)
    run.progress.begin(work_units(plan, len(traj), run.decode_batch, extra_runs=1), "denoise+decode")
    out = []
    with installed(run.unet, make_processors(run.unet, ReferenceProcessor, state)):
        with timed(timings, "denoise", run.device):
            z = reference_run(run.unet, traj, state, run.cond, run.dtype, on_step=run.progress.tick)
        state.mode = "inject"
        for index, sign in plan:
            state.modulation = Modulation(masks, torch.tensor(index, device=run.device),
                                          torch.tensor(sign, device=run.device, dtype=torch.float32) * run.lam)
            with timed(timings, "denoise", run.device):
                x = denoise(run.unet, traj, traj.latents[0].expand(run.chunk, -1, -1, -1),
                            lambda i, x, eps: traj.step(i, x, eps, z[i]), state, run.cond, run.dtype,
                            run.modulate_steps, on_step=run.progress.tick)
            with timed(timings, "decode", run.device):
                out.append(decode_pairs(run, x, sign))
    return torch.cat(out)
