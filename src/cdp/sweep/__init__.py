"""Experiment grids (``cdp bench``): a YAML spec → one ``cdp`` subprocess per grid cell, run as Ray tasks, then
aggregated over seeds into markdown/CSV tables and PNG plots.

A spec (``configs/experiments/*.yaml``)::

    name: rl_maze_cpu
    job: rl                         # rl (cdp rl) | il (cdp train) | toy (cdp toy)
    out: runs/bench/rl_maze_cpu     # root of the run folders (relative: to the current directory)
    algos: [bc, edp, cdp]           # --algo.name: rl bc|edp|cdp|dql|cdp_dql|idql|cdp_idql; il presets;
                                    # toy: --algo.variants (one variant per cell)
    datasets: [PointMaze_UMaze-v3]  # rl: --data.env, or a D4RL name hopper-medium-replay (made by cdp data mujoco);
                                    # il: --data.task; toy: a label only (the 2-D four-mode mixture)
    fractions: [1.0, 0.1]           # --data.fraction (toy: 1.0 only)
    seeds: [0, 1, 2]                # --train.seed
    overrides: {train.steps: 2000, eval.episodes: 10, train.threads: 1}   # any other key of the config tree
    algo_overrides: {cdp: {policy.contraction.weight: 0.3}}   # optional: keys for one algo only (win over 'overrides')
    variants:                       # optional: named settings of a preset, listed in 'algos' like a preset
      cdp_w0.3: {algo: cdp, policy.contraction.weight: 0.3}
    baselines: {cdp: edp}           # optional: algo → its base, for the CDP/base compute ratio
    workers: 2                      # optional default of --workers
    shared_dataset: true            # rl only (default): generate the PointMaze dataset once for all cells
    data: {root: runs/data, max_steps: 300000}   # rl, D4RL-named datasets: where and how `cdp data mujoco` makes
                                    # them (cdp.datagen.mujoco.MujocoDataConfig fields) before the grid starts;
                                    # il, lift / can: {root, n_demos, seed, noise} of the scripted demos

Each cell runs ``python -m cdp.cli <job> ... --out <out>/<job>/<algo>/<dataset>/frac<f>/seed<s>`` (stdout+stderr in
``bench.log`` there). Overrides use the dotted keys of :class:`cdp.config.ExperimentConfig` (or nested mappings)
and are validated against the job's config tree before anything runs. A cell whose results file exists is skipped;
any other cell is (re)started with the same ``--out``, which resumes it from its checkpoint (toy runs are short and
restart). With ``train.device`` cuda (an override), each cell asks Ray for one GPU, so a cluster of GPU nodes runs
one cell per GPU. Aggregates go to ``<out>/<job>/summary/``.
"""
