"""The end-to-end benchmark (`liftavatar bench`) and the demo (`liftavatar demo`, the same protocol at demo size):
the paper's protocol on held-out synthetic subjects, its tables, curve, plots and HTML report.

The subjects are held out (seeds 5400–5499 by default; the embedded prior was trained on
100000–101999). Per subject, each stage writes into its own folder under
``RUN/subjects/s<seed>/`` and is skipped when its output is complete, so an interrupted run resumes:

1. **synth** — the subject performs a ``sparse`` trajectory (what a phone video holds: talking-range
   expressions, small head turns; ``train_frames + seen_frames`` frames) and an ``extreme`` one
   (strong expressions absent from it and wider poses; ``extreme_frames``), rendered at
   ``render_size``² with the synthetic world's camera (30° field of view). These are the ground truth.
2. **video** — one recording: the sparse take, a few black frames, the extreme take, as an H.264
   ``.mp4`` (what a person would upload).
3. **track** — the real tracker on that video (MediaPipe FaceMesh + rig fit) into a ``size``² Capture.
   Like the monocular-avatar benchmarks the paper follows, the recording is tracked once and split
   afterwards, so the train and test frames share one crop, camera and identity. The black frames
   carry no face, so the tracker's temporal smoothing barely couples the two takes.
4. **split** — three captures: ``train`` (the first ``train_frames`` frames), ``test_seen`` (the
   rest of the sparse take: unseen frames of the seen range) and ``test_extreme`` (the extreme
   take). Test captures keep only frames where the tracker found a face. Test frames never reach
   reference selection, lifting or avatar training.
5. **refs** — K-means reference frames of ``train`` (stored in its capture.json).
6. **lift** — ``train`` lifted with ``max(curve)`` expressions by the prior. Lifting is greedy
   (farthest-point targets, one clip and one seed per target, in order), so the first ``k`` clips of
   that run are exactly what lifting with ``k`` expressions gives; the captures for the other points
   of the curve (``lifted_kNNN``) are prefixes of it, written with hard links.
7. **avatars** — per point ``k`` of the curve, a Gaussian avatar trained for ``avatar_iters``
   iterations on ``train`` (k = 0: the baseline) or on ``lifted_kNNN``, with the avatar trainer's recipe
   (:class:`liftavatar.avatar.train.TrainConfig`, whose defaults are the benchmark's): one frame is drawn per
   iteration; with ``observed_share`` > 0 the observed frames are repeated so that they make about
   that share of the draws (lifted frames would otherwise outnumber them up to 5 to 1), and lifted
   frames weigh ``lifted_weight`` in the loss (generated frames are less exact than filmed ones).
   The last ``observed_finish`` share of the iterations draws observed frames only. Every avatar gets the
   same iterations, initial seed and settings.
   Each avatar then drives through the test captures' tracked kinematics and camera, rendering over
   black (``renders_{split}.npz``).
8. **eval** — the renders are compared with the test frames times their masks: PSNR, SSIM, AED, APD,
   CSIM (LPIPS and FID when their weights are on disk), with :func:`liftavatar.metrics.evaluate.evaluate`.
   It reads only the files of stage 7, so renders made on a GPU machine evaluate on another. The same
   metrics are taken of the **oracle appearance** (``oracle/``): the synthetic world's own renderer, with
   the subject's true texture, on the rig driven exactly as the avatars are (the test captures' tracked
   kinematics, tracked identity and camera), masked as the test frames are (cut at the collar line like the
   tracked masks). It is what an avatar that had learned the subject's appearance
   perfectly would show, so its AED is what the tracked test kinematics alone cost a perfectly textured rig
   (a reference, not a floor: an avatar trained on frames tracked with the same biases can land below it,
   the biases cancelling).

**Real clips** (``bench --videos``, ``demo --video``; :mod:`liftavatar.bench.real`): each clip is a subject named by
its file's stem, whose stages start at **track** (the clip itself, with `track`'s default camera); **split** is by
kinematics (the clip's rarest expressions and poses as the extreme test, every 5th block of 8 frames of the rest as
the seen test, ±3-frame guard bands), and there is no oracle appearance (no true texture of a real person exists).
Everything else is as above, on the same folders and records.

A stage is skipped when its record is complete or a later stage's is, so a run folder may travel between
machines without the earlier stages' bulky outputs (``run_bench(until=...)``, ``bench --until``;
``benchmarks/bench_split.py`` runs the data stages and the evaluation on one machine and the lift and avatars on a
GPU machine). Every stage records the machine it ran on.

Then the run's results are aggregated (:mod:`liftavatar.bench.summary`) into ``results.json``,
``results.md``, plots, and the HTML report (:mod:`liftavatar.bench.html`) in ``RUN/report/``.

Modules, each importing only those listed before it: :mod:`~liftavatar.bench.config` (:class:`BenchConfig`, the
subjects, the presets), :mod:`~liftavatar.bench.layout` (run-folder paths, stage records, what a split run carries),
:mod:`~liftavatar.bench.real` (real clips: what a run records of them, their split by kinematics),
:mod:`~liftavatar.bench.stages` (stages 1–6), :mod:`~liftavatar.bench.jobs` (stages 7–8 and the oracle),
:mod:`~liftavatar.bench.summary`, :mod:`~liftavatar.bench.plots`, :mod:`~liftavatar.bench.html` and
:mod:`~liftavatar.bench.runner` (:func:`run_bench`: worker processes, CUDA warm-up, the order of it all).
"""

from __future__ import annotations

from liftavatar.bench.config import BenchConfig, demo_config, full_config, quick_config
from liftavatar.bench.runner import run_bench

__all__ = ["BenchConfig", "demo_config", "full_config", "quick_config", "run_bench"]
