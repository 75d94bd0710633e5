"""Dataset makers: PointMaze (:mod:`.maze`, D4RL maze2d recipe), SAC-generated MuJoCo locomotion datasets
(:mod:`.mujoco`, D4RL recipe) and scripted robosuite Lift / Can demonstrations (:mod:`.robosuite`), behind
``cdp data``. They write files that :mod:`cdp.data` reads and use :mod:`cdp.envs` for the environments."""
