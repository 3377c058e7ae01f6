"""metaloop's Hydra plugins: the SLURM launcher of ``launcher=submitit_slurm`` (:mod:`.slurm_launcher`)."""
