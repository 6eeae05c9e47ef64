"""Training: :class:`~sslcli.engine.trainer.Trainer` and its parts.

``trainer``     the loop: ``Trainer.fit`` in phases, ``train_one_epoch``, ``train_step``
``setup``       process group, run directory, training data, model assembly
``batches``     which images each step sees, cut how, prefetched to the device
``schedule``    the step horizon and the lr / weight-decay factors (pure functions of the step)
``resume``      what a checkpoint holds of a run, and whether a run may continue from it
``stopping``    signals, the cross-process stop agreement, the interrupted exit
``grad_guard``  gradient clipping, non-finite steps skipped with their buffers put back
``forward``     the step's forward, compiled or eager
``monitor``     kNN before and after training, the online linear probe
``logger``      the log window of per-step values, metrics.jsonl / TensorBoard / console
``plan``, ``memory``, ``dryrun``  ``ssl train --dry-run``: the plan and its memory estimate
``knn_monitor`` kNN spread over every process;  ``sync_guard``  host-sync accounting

None of the parts imports the trainer.
"""
