"""metaloop's SLURM launcher (``launcher=submitit_slurm``): Hydra's submitit launcher, waiting inside :func:`metaloop.cli.slurm.watched_queue`.

It lives in the ``hydra_plugins`` package because Hydra instantiates launchers from there only.
Without hydra-submitit-launcher this module defines nothing, so Hydra's plugin scan stays quiet.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
except ImportError:  # metaloop[launchers] is not installed: metaloop.cli refuses launcher=submitit_slurm first
    _SubmititSlurmLauncher = None

if _SubmititSlurmLauncher is not None:
    from hydra.core.utils import JobReturn

    from metaloop.cli.slurm import watched_queue

    class SlurmLauncher(_SubmititSlurmLauncher):
        """Hydra's submitit SLURM launcher whose refused or unrunnable jobs end the sweep with one message."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            with watched_queue(self.params, self.config):
                return super().launch(job_overrides, initial_job_idx)
