"""Data in and out of the models (DESIGN §2).

Importing the package applies the loopback defaults of pipeline.ray_env before anything imports
Ray: Ray fixes the node address at import time, and a local cluster must never bind to (or let
torch.distributed rendezvous on) an address other than 127.0.0.1 (DESIGN §5).
"""
from pipeline.ray_env import loopback_environment as _loopback_environment

_loopback_environment()
