"""Core: what every package may use, with no torch and no Ray.

    config.py    typed configs from YAML with `key.sub=value` overrides, one-line errors, secret redaction
    cli.py       the command line of a config: --help lists its fields (type, default, description), --print-config
    settings.py  settings shared across layers (sampling, LoRA), so validating a run config needs no torch
    atomic.py    write a file or a folder atomically: temp, fsync, rename, fsync of the parent
    resources.py the one-line error for GPUs the cluster lacks (runs, stages, reward plug-ins)
"""
