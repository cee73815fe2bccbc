"""The options and help text of the commands whose run code imports torch.

``eegfast.cli`` builds a command's parser from ``options.<command>.configure_parser`` and
imports the command's own module (torch, the models, the training loop) only once the
arguments parse: ``eegfast <command> --help`` and a usage error print at once. Each command
module imports its ``configure_parser`` (and the defaults its help names) back from here.
Nothing here may import torch, numpy-heavy stacks or the training loop.
"""
